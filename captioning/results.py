"""The results store: the `captions` table (the system of record) and S3 sidecars.

One row per (uri, etag, model, prompt), keyed by a hash of those four so every write is an
idempotent upsert: a redelivered job rewrites its rows instead of adding new ones.

A `pending` row is an upload a listener accepted and has not seen a result for yet: written
before the listener acknowledges, so the upload survives a Redis that loses its queues (the
reconciler sends it again). Its `attempts` is 0 and its `finished_at` is when it was last
handed to the queue; the worker's `ok` or `failed` row replaces it under the same key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    create_engine,
    delete,
    event,
    exists,
    func,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from captioning.errors import ConfigError, DatabaseUnavailable
from captioning.kinds import CAPTION

Status = Literal["ok", "failed", "pending"]
PENDING: Status = "pending"

NO_TABLE = (
    "the captions table does not exist in CAPTIONER_DATABASE_URL: "
    "run `captioner db upgrade` once before starting workers"
)

metadata = MetaData()

captions = Table(
    "captions",
    metadata,
    Column("id", String(64), primary_key=True, comment="sha256 of uri, etag, model, prompt"),
    Column("uri", Text, nullable=False),
    Column("bucket", Text, nullable=False),
    Column("key", Text, nullable=False),
    Column("etag", Text, nullable=False, comment="'' when unknown"),
    Column("version_id", Text),
    Column("model", Text, nullable=False),
    Column("prompt", Text, nullable=False, comment="'' when absent"),
    Column("status", String(8), nullable=False),
    Column("caption", Text),
    Column("error", Text),
    Column("width", Integer),
    Column("height", Integer),
    Column("bytes", Integer),
    Column("attempts", Integer, nullable=False),
    Column("enqueued_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    Column("worker", Text),
    Column("content_digest", Text, comment="sha256 of the image bytes; null if never fetched"),
    Column("kind", Text, comment="caption, tags, ...; NULL on rows from before kinds: caption"),
    Column(
        "tags",
        JSON().with_variant(postgresql.JSONB(), "postgresql"),
        comment="tags kind: {category: {tag: probability}}; interrogate kind: the prompt's "
        "terms, {list: {term: cosine similarity}}",
    ),
    Column("match_probability", Float, comment="ITM: P(caption matches image), by scorer"),
    Column("itc_cosine", Float, comment="ITC: image-caption cosine similarity, by scorer"),
    Column("scorer", Text, comment="the ITM model that scored the caption"),
    Column("candidates", JSON, comment="CapFilt: [{caption, match_probability, itc_cosine}]"),
    Index("ix_captions_uri", "uri"),
    Index("ix_captions_status_finished", "status", "finished_at"),
    Index("ix_captions_digest", "content_digest", "model", "prompt"),
)


@dataclass(frozen=True)
class CaptionRow:
    uri: str
    bucket: str
    key: str
    etag: str
    version_id: str | None
    model: str
    prompt: str
    status: Status
    caption: str | None
    error: str | None
    width: int | None
    height: int | None
    bytes: int | None
    enqueued_at: datetime | None
    finished_at: datetime
    worker: str | None
    attempts: int = 1
    content_digest: str | None = None
    kind: str | None = None
    tags: dict[str, dict[str, float]] | None = None
    match_probability: float | None = None
    itc_cosine: float | None = None
    scorer: str | None = None
    # Every candidate caption (greedy first, then the samples) with its scores.
    candidates: list[dict[str, Any]] | None = None

    @property
    def row_id(self) -> str:
        return row_id(self.uri, self.etag, self.model, self.prompt)

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        for name in ("enqueued_at", "finished_at"):
            if record[name] is not None:
                record[name] = record[name].isoformat()
        return record


def row_id(uri: str, etag: str, model: str, prompt: str) -> str:
    return hashlib.sha256(f"{uri}\0{etag}\0{model}\0{prompt}".encode()).hexdigest()


def sidecar_key(prefix: str, row: CaptionRow, *, main_prompt: str | None = None) -> str:
    """`<prefix>/<source bucket>/<source key>.json` for a caption, `....<kind>.json` for
    another kind (`photo.jpg.tags.json`); local files go under `_local/`. Caption rows of a
    job's later prompts (not `main_prompt`) go next to it, in `<source key>.<12 hex digits of
    the prompt's sha256>.json`, so one image's prompts never overwrite each other."""
    source = f"{row.bucket}/{row.key}" if row.bucket else f"_local{row.key}"
    if row.kind not in (None, CAPTION.name):
        source += f".{row.kind}"
    elif main_prompt not in (None, row.prompt):
        source += "." + hashlib.sha256(row.prompt.encode()).hexdigest()[:12]
    return f"{prefix.strip('/')}/{source}.json".lstrip("/")


def sidecar_body(row: CaptionRow) -> bytes:
    return json.dumps(row.to_json(), ensure_ascii=False, sort_keys=True).encode()


def normalize_database_url(url: str) -> str:
    """Accept plain postgres URLs and use psycopg 3, the driver we ship."""
    for plain in ("postgres://", "postgresql://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain) :]
    return url


@dataclass(frozen=True)
class EarlierCaption:
    """What content dedupe copies from an earlier row: the caption and its scores."""

    caption: str
    scorer: str | None
    match_probability: float | None
    itc_cosine: float | None
    candidates: list[dict[str, Any]] | None


class ResultsStore:
    def __init__(self, database_url: str) -> None:
        url = normalize_database_url(database_url)
        # A host that drops packets fails in 10 s, not after the kernel's two minutes.
        connect_args = {"connect_timeout": 10} if url.startswith("postgresql") else {}
        try:
            self.engine: Engine = create_engine(
                url, pool_pre_ping=True, pool_recycle=1800, connect_args=connect_args
            )
        except Exception as exc:
            raise ConfigError(f"CAPTIONER_DATABASE_URL is not usable: {exc}") from exc
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)

    @contextmanager
    def _connection(self, *, write: bool) -> Iterator[Any]:
        try:
            with self.engine.begin() if write else self.engine.connect() as conn:
                yield conn
        except DBAPIError as exc:
            if _is_missing_table(exc):
                raise ConfigError(NO_TABLE) from exc
            lost = isinstance(exc, (OperationalError, InterfaceError)) or exc.connection_invalidated
            if not lost:
                raise
            reason = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else ""
            raise DatabaseUnavailable(
                f"results database unavailable ({type(exc.orig).__name__}: {reason})"
            ) from exc

    def create_schema(self) -> list[str]:
        """Create the table, or add the columns a newer release defines to an existing one
        (all nullable, so existing rows are untouched); returns the columns added."""
        with self._connection(write=True) as conn:
            metadata.create_all(conn)
            present = {column["name"] for column in inspect(conn).get_columns(captions.name)}
            missing = [column for column in captions.columns if column.name not in present]
            quote = conn.dialect.identifier_preparer.quote
            for column in missing:
                assert column.nullable, f"a column added to old rows must be nullable: {column}"
                column_type = column.type.compile(dialect=conn.dialect)
                conn.execute(
                    text(f"ALTER TABLE {quote(captions.name)} ADD COLUMN {quote(column.name)} "
                         f"{column_type}")
                )
            for index in captions.indexes:
                index.create(conn, checkfirst=True)
            return [column.name for column in missing]

    def require_schema(self) -> None:
        """Fail fast at worker start: without the table every job would retry, then die."""
        with self._connection(write=False) as conn:
            present = inspect(conn).has_table(captions.name)
        if not present:
            raise ConfigError(NO_TABLE)

    def _insert(self, rows: Sequence[CaptionRow]) -> Any:
        """An INSERT of `rows` in this database's dialect, which knows ON CONFLICT."""
        values = [{"id": row.row_id, **asdict(row)} for row in rows]
        dialect = self.engine.dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        return insert(captions).values(values)

    def upsert(self, rows: Sequence[CaptionRow]) -> None:
        if not rows:
            return
        statement = self._insert(rows)
        updated = {
            column.name: statement.excluded[column.name]
            for column in captions.columns
            if column.name not in ("id", "attempts")
        }
        updated["attempts"] = captions.c.attempts + 1
        statement = statement.on_conflict_do_update(index_elements=["id"], set_=updated)
        with self._connection(write=True) as conn:
            conn.execute(statement)

    def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """Ids with a result (pending ones have none), one query per page of candidates:
        backfills ask about 1,000 keys at once."""
        if not ids:
            return set()
        query = select(captions.c.id).where(
            captions.c.id.in_(list(ids)), captions.c.status != PENDING
        )
        with self._connection(write=False) as conn:
            return {found for (found,) in conn.execute(query)}

    def record_pending(self, rows: Sequence[CaptionRow]) -> None:
        """Insert `pending` rows; a row already there (a result, or pending) is left alone."""
        if not rows:
            return
        statement = self._insert(rows).on_conflict_do_nothing(index_elements=["id"])
        with self._connection(write=True) as conn:
            conn.execute(statement)

    def pending_before(self, moment: datetime, limit: int) -> list[CaptionRow]:
        """Pending rows last handed to the queue before `moment`, oldest first."""
        query = (
            select(*(c for c in captions.columns if c.name != "id"))
            .where(captions.c.status == PENDING, captions.c.finished_at < moment)
            .order_by(captions.c.finished_at)
            .limit(limit)
        )
        with self._connection(write=False) as conn:
            return [CaptionRow(**row._mapping) for row in conn.execute(query)]

    def mark_requeued(self, rows: Sequence[CaptionRow], moment: datetime) -> None:
        ids = [row.row_id for row in rows]
        statement = (
            update(captions)
            .where(captions.c.id.in_(ids), captions.c.status == PENDING)
            .values(finished_at=moment)
        )
        with self._connection(write=True) as conn:
            conn.execute(statement)

    def settle_pending(self) -> int:
        """Delete pending rows that a result for the same image made moot: one written under
        another etag (the event had none, or the object changed) after the upload came in."""
        result_row = captions.alias("result")
        superseded = exists().where(
            and_(
                result_row.c.uri == captions.c.uri,
                result_row.c.model == captions.c.model,
                result_row.c.prompt == captions.c.prompt,
                result_row.c.status != PENDING,
                result_row.c.finished_at >= captions.c.enqueued_at,
            )
        )
        statement = delete(captions).where(captions.c.status == PENDING, superseded)
        with self._connection(write=True) as conn:
            return int(conn.execute(statement).rowcount or 0)

    def rows(
        self,
        *,
        prefix: str | None = None,
        status: Status | None = None,
        kind: str | None = None,
        limit: int | None = None,
        min_score: float | None = None,
    ) -> list[CaptionRow]:
        """Rows by URI; `kind` caption includes the rows written before kinds (kind NULL);
        `min_score` keeps scored rows whose match probability reaches it."""
        query = select(*(c for c in captions.columns if c.name != "id")).order_by(
            captions.c.uri, captions.c.kind
        )
        if prefix:
            query = query.where(captions.c.uri.startswith(prefix, autoescape=True))
        if status:
            query = query.where(captions.c.status == status)
        if kind == CAPTION.name:
            query = query.where(or_(captions.c.kind == kind, captions.c.kind.is_(None)))
        elif kind:
            query = query.where(captions.c.kind == kind)
        if min_score is not None:
            query = query.where(captions.c.match_probability >= min_score)
        if limit:
            query = query.limit(limit)
        with self._connection(write=False) as conn:
            return [CaptionRow(**row._mapping) for row in conn.execute(query)]

    def earlier_captions(
        self, digests: Sequence[str], model: str, prompt: str, scorer: str | None
    ) -> dict[str, EarlierCaption]:
        """`ok` rows for these image contents, model and prompt: content dedupe asks once per
        micro-batch (ix_captions_digest). With a scorer, only rows it scored, so that a copy
        carries the scores a fresh run would have written."""
        if not digests:
            return {}
        query = select(
            captions.c.content_digest, captions.c.caption, captions.c.scorer,
            captions.c.match_probability, captions.c.itc_cosine, captions.c.candidates,
        ).where(
            captions.c.content_digest.in_(list(set(digests))),
            captions.c.model == model,
            captions.c.prompt == prompt,
            captions.c.status == "ok",
        )
        if scorer is not None:
            query = query.where(captions.c.scorer == scorer)
        with self._connection(write=False) as conn:
            return {digest: EarlierCaption(*found) for digest, *found in conn.execute(query)}

    def status_counts(self) -> dict[str, int]:
        query = select(captions.c.status, func.count()).group_by(captions.c.status)
        with self._connection(write=False) as conn:
            return {status: count for status, count in conn.execute(query)}

    def finished_since(self, since: datetime) -> dict[str, int]:
        """Rows finished at or after `since`, by status (uses the status, finished_at index)."""
        query = (
            select(captions.c.status, func.count())
            .where(captions.c.finished_at >= since)
            .group_by(captions.c.status)
        )
        with self._connection(write=False) as conn:
            return {status: count for status, count in conn.execute(query)}

    def dispose(self) -> None:
        self.engine.dispose()


def _is_missing_table(exc: DBAPIError) -> bool:
    """SQLite says "no such table"; PostgreSQL raises SQLSTATE 42P01 (undefined_table)."""
    return "no such table" in str(exc.orig) or getattr(exc.orig, "sqlstate", None) == "42P01"


def utcnow() -> datetime:
    return datetime.now(UTC)


def _sqlite_pragmas(dbapi_connection: Any, _record: object) -> None:
    """WAL and a busy timeout let the demo's worker and CLI share one SQLite file."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()
