"""`captioner db upgrade`: create the captions table where it is missing, or add the columns
a newer release defines."""

from __future__ import annotations

import argparse

from captioning.results import ResultsStore
from captioning.settings import get_settings


def add_parsers(commands: argparse._SubParsersAction) -> None:
    database = commands.add_parser("db", help="database schema")
    database.add_argument("action", choices=("upgrade",),
                          help="upgrade: create what the results schema lacks (safe to run again)")
    database.set_defaults(run=cmd_db)


def cmd_db(args: argparse.Namespace) -> int:
    added = ResultsStore(get_settings().database_url).create_schema()
    if added:
        print(f"added columns {', '.join(added)} (existing rows keep NULL there)")
    print("captions table is up to date")
    return 0
