"""`captioner export`: the results table as Parquet, JSONL or CSV, or as caption .txt files."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from captioning.exporting import Selection, count, export
from captioning.results import ResultsStore
from captioning.settings import get_settings
from captioning.storage import S3Store
from cli.arguments import since_date


def add_parsers(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export", help="write caption rows to a dataset file, or .txt caption files"
    )
    parser.add_argument("--format", choices=("parquet", "jsonl", "csv", "txt"),
                        default="parquet",
                        help="a dataset file, or txt: <image name>.txt per captioned image "
                        "(default %(default)s)")
    parser.add_argument(
        "--output", "-o", default="", metavar="PATH|s3://bucket/key",
        help="file to write; for txt a folder or s3:// prefix (default: beside local images)",
    )
    parser.add_argument("--prefix", help="only URIs starting with this, e.g. s3://bucket/dir/")
    parser.add_argument("--model", help="only rows of this model")
    parser.add_argument("--status", choices=("ok", "failed", "pending"),
                        help="only rows with this status")
    parser.add_argument("--since", type=since_date, metavar="DATE",
                        help="only rows finished at or after DATE (ISO 8601, UTC default)")
    parser.set_defaults(run=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    settings = get_settings()
    store = ResultsStore(settings.database_url)
    selection = Selection(prefix=args.prefix, model=args.model, status=args.status,
                          since=args.since)
    total = count(store, selection)
    with tqdm(total=total, unit=" rows", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        written = export(store, selection, args.format, args.output,
                         s3=lambda: S3Store(settings), on_rows=bar.update)
    what = "caption files" if args.format == "txt" else f"rows to {args.output}"
    print(f"exported {written} {what} ({total} rows selected)")
    return 0
