"""`python -m cli ...` runs the `captioner` command (tests and child processes use it)."""

import sys

from cli.main import main

sys.exit(main())
