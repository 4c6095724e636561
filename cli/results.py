"""`captioner results`: caption rows as a table, JSON lines or CSV."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable, Sequence
from typing import TextIO, get_args

from captioning.kinds import CAPTION, KINDS
from captioning.results import CaptionRow, ResultsStore, Status
from captioning.settings import get_settings
from cli.arguments import positive


def add_parsers(commands: argparse._SubParsersAction) -> None:
    results = commands.add_parser("results", help="print caption rows")
    results.add_argument("--format", choices=("table", "jsonl", "csv"), default="table",
                         help="output format (default %(default)s)")
    results.add_argument("--prefix", help="only URIs starting with this, e.g. s3://bucket/dir/")
    results.add_argument("--status", choices=get_args(Status),
                         help="only rows with this status (pending: uploads accepted, no "
                              "result yet)")
    results.add_argument("--kind", choices=tuple(KINDS),
                         help="only rows of this kind (caption includes rows from before kinds)")
    results.add_argument("--limit", type=positive, metavar="N", help="print at most N rows")
    results.set_defaults(run=cmd_results)


def cmd_results(args: argparse.Namespace) -> int:
    rows = ResultsStore(get_settings().database_url).rows(
        prefix=args.prefix, status=args.status, kind=args.kind, limit=args.limit
    )
    write_rows(rows, args.format, sys.stdout)
    return 0


def write_rows(rows: Iterable[CaptionRow], fmt: str, out: TextIO) -> None:
    records = [row.to_json() for row in rows]
    if fmt == "jsonl":
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    elif fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=list(CaptionRow.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(
            {**record, "tags": json.dumps(record["tags"], ensure_ascii=False)}
            if record["tags"] is not None else record
            for record in records
        )
    else:
        out.write(format_table(records))


def format_table(records: Sequence[dict[str, object]]) -> str:
    columns = ("status", "kind", "uri", "caption / error")
    cells = [
        (
            str(r["status"]),
            str(r["kind"] or CAPTION.name),
            shorten(str(r["uri"]), 60, keep_end=True),
            shorten(str(r["caption"] if r["status"] == "ok" else r["error"] or ""), 70),
        )
        for r in records
    ]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = [columns, tuple("-" * w for w in widths), *cells]
    body = "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)
    return f"{body}\n({len(records)} rows)\n"


def shorten(text: str, width: int, *, keep_end: bool = False) -> str:
    """Fit a cell: URIs keep their end (the file name), captions their beginning."""
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1) :] if keep_end else text[: width - 1] + "…"
