"""Event listeners: an SQS long-poller and an HTTP webhook, both feeding one batcher.

Neither acknowledges an event before its uploads are recorded as `pending` rows in the results
database and their jobs are in Redis: the SQS message is deleted, and the webhook answers
2xx, only when the batcher's future completes. A crash in between means a redelivery, which
the deduper turns into nothing; a Redis that loses the jobs afterwards is covered by the
pending rows, which the reconciler sends again (captioning/reconcile.py).
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import sys
import threading
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from captioning.errors import ConfigError, InvalidEvent
from captioning.kinds import annotators, row_prompt
from captioning.results import PENDING, CaptionRow, ResultsStore, utcnow
from captioning.settings import Settings
from producer.batcher import BatcherClosed, LingerBatcher
from producer.dedupe import Deduper
from producer.enqueue import JobSender, make_jobs
from producer.events import ObjectRef, refs_from_event

log = logging.getLogger(__name__)

SQS_MAX_MESSAGES = 10
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
ENQUEUE_TIMEOUT_S = 30.0


def pending_rows(
    refs: Sequence[ObjectRef], annotators: Mapping[str, str], prompt: str
) -> list[CaptionRow]:
    """One pending row per image and kind, keyed as the worker will key its result."""
    now = utcnow()
    return [
        CaptionRow(
            uri=ref.uri, bucket=ref.bucket, key=ref.key, etag=ref.etag or "",
            version_id=ref.version_id, model=model, prompt=row_prompt(kind, prompt),
            status=PENDING, caption=None, error=None, width=None, height=None, bytes=None,
            enqueued_at=now, finished_at=now, worker=None, attempts=0, kind=kind,
        )
        for ref in refs
        for kind, model in annotators.items()
    ]


class EventEnqueuer:
    """The batcher's flush: drop duplicates, record the rest as pending, send them as jobs."""

    def __init__(
        self, sender: JobSender, deduper: Deduper, settings: Settings, batch_size: int
    ) -> None:
        self._sender = sender
        self._deduper = deduper
        self._results = ResultsStore(settings.database_url)
        self._settings = settings
        self._batch_size = batch_size
        self.duplicates = 0

    def __call__(self, refs: list[ObjectRef]) -> None:
        fresh = self._deduper.claim(refs)
        self.duplicates += len(refs) - len(fresh)
        try:
            wanted = annotators(self._settings, self._settings.kinds)
            self._results.record_pending(pending_rows(fresh, wanted, self._settings.prompt))
            for job in make_jobs(
                (ref.job_item() for ref in fresh),
                batch_size=self._batch_size,
                annotators=wanted,
                prompt=self._settings.prompt,
                source="event",
            ):
                self._sender.send(job)
        except BaseException:
            self._deduper.release(fresh)
            raise
        log.debug("enqueued %d event images (%d duplicates)", len(fresh), len(refs) - len(fresh))


def open_queue(queue_url: str, endpoint_url: str | None) -> Any:
    """An SQS client that has read the queue once: a wrong URL, region or credential fails
    the listener at start, instead of filling its log with retries that never succeed."""
    try:
        client = boto3.client("sqs", endpoint_url=endpoint_url)
        client.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])
    except NoCredentialsError as exc:
        raise ConfigError(
            f"no AWS credentials for SQS ({exc}): set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a role (IRSA)"
        ) from exc
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise ConfigError(
            f"SQS refused {queue_url} ({error.get('Code')}: {error.get('Message')}): check "
            "--queue-url, and that these credentials may sqs:ReceiveMessage on it"
        ) from exc
    except BotoCoreError as exc:
        raise ConfigError(
            f"cannot reach SQS ({exc}): check --endpoint-url, AWS_DEFAULT_REGION and the network"
        ) from exc
    return client


class SqsListener:
    """Long-polls one queue with a few receiver threads; deletes in batches of up to ten."""

    def __init__(
        self,
        client: Any,
        queue_url: str,
        batcher: LingerBatcher,
        *,
        receivers: int = 2,
        wait_s: int = 20,
    ) -> None:
        self._client = client
        self._queue_url = queue_url
        self._batcher = batcher
        self._receivers = receivers
        self._wait_s = wait_s
        self._done: queue.Queue[str | None] = queue.Queue()
        self.stopping = threading.Event()

    def run(self) -> None:
        """Poll until `stopping` is set, then flush and delete what was enqueued."""
        threads = [
            threading.Thread(target=self._receive_loop, name=f"sqs-receive-{n}", daemon=True)
            for n in range(self._receivers)
        ]
        deleter = threading.Thread(target=self._delete_loop, name="sqs-delete", daemon=True)
        for thread in (*threads, deleter):
            thread.start()
        log.info("listening on %s with %d receivers", self._queue_url, self._receivers)
        self.stopping.wait()
        self._batcher.close()
        self._done.put(None)
        deleter.join()

    def _receive_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                response = self._client.receive_message(
                    QueueUrl=self._queue_url,
                    MaxNumberOfMessages=SQS_MAX_MESSAGES,
                    WaitTimeSeconds=self._wait_s,
                )
            except (BotoCoreError, ClientError) as exc:
                log.error("SQS receive failed, retrying in 5 s: %s", exc)
                self.stopping.wait(5)
                continue
            for message in response.get("Messages", []):
                self._handle(message)

    def _handle(self, message: dict[str, Any]) -> None:
        handle = message["ReceiptHandle"]
        try:
            refs = refs_from_event(message.get("Body", ""))
        except InvalidEvent as exc:
            log.warning("message %s left for the redrive policy: %s", message.get("MessageId"), exc)
            return
        if not refs:
            self._done.put(handle)
            return
        try:
            future = self._batcher.submit(refs)
        except BatcherClosed:
            return
        future.add_done_callback(lambda f: self._done.put(handle) if not f.exception() else None)

    def _delete_loop(self) -> None:
        """Delete in batches of what is ready; `None` (queued after the last flush) ends it."""
        while True:
            handles = [self._done.get()]
            while len(handles) < SQS_MAX_MESSAGES and not self._done.empty():
                handles.append(self._done.get_nowait())
            self._delete([handle for handle in handles if handle is not None])
            if None in handles:
                return

    def _delete(self, handles: Sequence[str]) -> None:
        if not handles:
            return
        entries = [{"Id": str(n), "ReceiptHandle": h} for n, h in enumerate(handles)]
        try:
            response = self._client.delete_message_batch(QueueUrl=self._queue_url, Entries=entries)
        except (BotoCoreError, ClientError) as exc:
            log.error("SQS delete of %d messages failed (they will be redelivered): %s",
                      len(entries), exc)
            return
        for failure in response.get("Failed", []):
            log.error("SQS delete failed (message will be redelivered): %s", failure)


class WebhookServer(ThreadingHTTPServer):
    """POST S3 event JSON (MinIO, Ceph RGW); answers 200 only after the enqueue.

    The shared secret is accepted as `Authorization: Bearer <secret>` (what MinIO's
    `auth_token` sends) or `X-Captioner-Secret: <secret>`. GET /healthz answers 200.
    A client silent for `socket_timeout_s` (mid-request or idle on keep-alive) is dropped,
    so slow or stalled clients cannot pin server threads for ever.
    """

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        batcher: LingerBatcher,
        *,
        secret: str,
        socket_timeout_s: float,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        if not secret:
            raise ValueError("the webhook needs a shared secret")
        super().__init__(address, WebhookHandler)
        self.batcher = batcher
        self.secret = secret.encode()
        self.max_body_bytes = max_body_bytes
        self.socket_timeout_s = socket_timeout_s

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A sender hanging up on a keep-alive connection is routine, not a traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError):
            log.debug("webhook client %s disconnected: %s", client_address[0], error)
            return
        log.exception("webhook request from %s failed", client_address[0])


class WebhookHandler(BaseHTTPRequestHandler):
    server: WebhookServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        # StreamRequestHandler applies `timeout` to the socket; a read that times out ends
        # the request and closes the connection (BaseHTTPRequestHandler.handle_one_request).
        self.timeout = self.server.socket_timeout_s
        super().setup()

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._reply(HTTPStatus.OK, {"ok": True})
        else:
            self._reply(HTTPStatus.NOT_FOUND, {"error": "POST events to any path"})

    def do_POST(self) -> None:
        if not self._authorized():
            self._reply(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong shared secret"})
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._reply(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
            return
        if int(length) > self.server.max_body_bytes:
            self._reply(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                {"error": f"body over {self.server.max_body_bytes} bytes"},
            )
            return
        try:
            refs = refs_from_event(self.rfile.read(int(length)))
        except InvalidEvent as exc:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        try:
            self.server.batcher.submit(refs).result(timeout=ENQUEUE_TIMEOUT_S)
        except Exception as exc:
            log.error("webhook enqueue failed: %s", exc)
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "enqueue failed; retry"})
            return
        self._reply(HTTPStatus.OK, {"images": len(refs)})

    def _authorized(self) -> bool:
        offered = self.headers.get("X-Captioner-Secret", "")
        authorization = self.headers.get("Authorization", "")
        if authorization.startswith("Bearer "):
            offered = authorization.removeprefix("Bearer ")
        return hmac.compare_digest(offered.encode(), self.server.secret)

    def _reply(self, status: HTTPStatus, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        if status >= HTTPStatus.BAD_REQUEST:
            self.close_connection = True  # the request body may be unread
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Request lines only (never headers, which hold the secret), at debug level."""
        log.debug("webhook %s " + format, self.client_address[0], *args)
