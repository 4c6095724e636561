"""The root parser and the error boundary: every command group plugs its subcommands in here."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from captioning.errors import CaptionerError
from cli import db, demo, export, jobs, listen, ops, results, worker

COMMAND_GROUPS = (jobs, listen, worker, ops, results, export, db, demo)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("CAPTIONER_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args) or 0)
    except CaptionerError as exc:
        print(f"captioner: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("captioner: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captioner",
        description="Caption images at scale with BLIP-2. Settings come from CAPTIONER_* "
        "environment variables (see README).",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_parsers(commands)
    return parser
