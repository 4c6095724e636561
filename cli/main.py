"""The root parser and the error boundary: every command group plugs its subcommands in here.

A user's mistake (a setting that does not parse, a service that cannot be reached, missing
or refused credentials, a bucket that does not exist, a refused URI, a file that cannot be
read) is one line on stderr that says what to do, and exit code 2. `--debug` or
`CAPTIONER_LOG_LEVEL=DEBUG` prints the traceback above that line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from captioning.broker import broker_errors
from captioning.errors import (
    AccessDenied,
    BrokerUnavailable,
    CaptionerError,
    ConfigError,
    DatabaseUnavailable,
    ObjectMissing,
    StoreCredentialsError,
    StoreUnavailable,
)
from cli import db, demo, export, jobs, listen, ops, results, worker

COMMAND_GROUPS = (jobs, listen, worker, ops, results, export, db, demo)
EXIT_MISTAKE = 2
EXIT_INTERRUPTED = 130

#: What to do about each kind of failure, first match wins (subclasses first). Types not
#: listed (ConfigError, UriRefused, ...) carry the remedy in their message.
ADVICE: tuple[tuple[type[CaptionerError], str], ...] = (
    (BrokerUnavailable, "start Redis or fix CAPTIONER_BROKER_URL"),
    (DatabaseUnavailable, "start the database or fix CAPTIONER_DATABASE_URL"),
    (StoreCredentialsError, ""),
    (StoreUnavailable, "start the object store or fix CAPTIONER_S3_ENDPOINT_URL"),
    (ObjectMissing, "check the bucket name and CAPTIONER_S3_ENDPOINT_URL"),
    (AccessDenied, "grant these credentials s3:ListBucket and s3:GetObject on it"),
)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("CAPTIONER_LOG_LEVEL", "").upper() == "DEBUG"
    try:
        configure_logging(debug)
        with broker_errors():
            return int(args.run(args) or 0)
    except CaptionerError as exc:
        if debug:
            traceback.print_exc()
        print(one_line(exc), file=sys.stderr)
        return EXIT_MISTAKE
    except KeyboardInterrupt:
        print("captioner: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def one_line(exc: CaptionerError) -> str:
    message = " ".join(str(exc).split())
    advice = next((text for kind, text in ADVICE if isinstance(exc, kind)), "")
    return f"captioner: error: {message}: {advice}" if advice else f"captioner: error: {message}"


def configure_logging(debug: bool) -> None:
    level = "DEBUG" if debug else os.environ.get("CAPTIONER_LOG_LEVEL", "INFO").upper()
    if level not in logging.getLevelNamesMapping():
        raise ConfigError(
            f"CAPTIONER_LOG_LEVEL={level!r} is not a log level: use DEBUG, INFO, WARNING or ERROR"
        )
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not debug:
        logging.getLogger("botocore").setLevel(logging.WARNING)  # "Found credentials in ..."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="captioner",
        description="Caption images at scale with BLIP-2. Settings come from CAPTIONER_* "
        "environment variables (see README). Exit code 2: a mistake to fix, described in "
        "one line on stderr.",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_parsers(commands)
    add_debug_flag(parser, default=False)
    return parser


def add_debug_flag(parser: argparse.ArgumentParser, *, default: object) -> None:
    """`--debug` before or after any (sub)command name; subcommands keep the root's value."""
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on an error, print the traceback too (as CAPTIONER_LOG_LEVEL=DEBUG)")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                add_debug_flag(subparser, default=argparse.SUPPRESS)
