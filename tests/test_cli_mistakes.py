"""Every mistake a user can make is one line on stderr that says what to do, and exit code 2.

Table-driven and on real processes: each row runs `python -m cli ...` in a fresh process
against a private password-protected redis-server, PostgreSQL and a SeaweedFS that checks
signatures, with one thing wrong (a setting, a stopped port, a credential, a name).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from captioning.embedded import free_port
from captioning.results import ResultsStore
from tests.faults import RedisServer
from tests.services import SeaweedS3

pytestmark = pytest.mark.timeout(120)

# The identity the store knows: the credentials conftest gives every test process.
ACCESS_KEY, SECRET_KEY = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
STOPPED = free_port()  # nothing listens here: a service that is down

# Every subcommand, as a user would type it with nothing else wrong.
EVERY_COMMAND = {
    "enqueue": ["enqueue", "s3://photos/a.jpg"],
    "backfill": ["backfill", "s3://photos/one/"],
    "listen-webhook": ["listen", "webhook", "--port", "0"],
    "listen-sqs": ["listen", "sqs", "--queue-url", "{sqs_queue}", "--endpoint-url", "{sqs}"],
    "worker": ["worker"],
    "exporter": ["exporter", "--port", "0"],
    "health": ["health"],
    "results": ["results"],
    "status": ["status"],
    "dead-list": ["dead", "list"],
    "dead-requeue": ["dead", "requeue"],
    "dead-purge": ["dead", "purge"],
    "db-upgrade": ["db", "upgrade"],
    "demo": ["demo"],
}


@dataclass(frozen=True)
class Mistake:
    args: list[str]
    env: dict[str, str | None]
    says: str  # the part of the line that tells the user what to do
    code: int = 2
    stdin: bytes = b""
    files: dict[str, bytes] = field(default_factory=dict)


BAD_SETTING = {"CAPTIONER_BATCH_SIZE": "abc"}
BROKER_DOWN = {"CAPTIONER_BROKER_URL": f"redis://:right@127.0.0.1:{STOPPED}/0"}
NO_AWS = {
    "AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
}

MISTAKES: dict[str, Mistake] = {
    **{
        f"bad-setting-{name}": Mistake(args, BAD_SETTING, "CAPTIONER_BATCH_SIZE='abc'")
        for name, args in EVERY_COMMAND.items()
    },
    "setting-out-of-range": Mistake(
        ["enqueue", "s3://photos/a.jpg"], {"CAPTIONER_MAX_IMAGE_BYTES": "0"},
        "CAPTIONER_MAX_IMAGE_BYTES='0': Input should be greater than or equal to 1",
    ),
    "relative-allowed-root": Mistake(
        ["backfill", "s3://photos/one/"], {"CAPTIONER_ALLOWED_ROOTS": "images"},
        "CAPTIONER_ALLOWED_ROOTS entries must be absolute",
    ),
    "bad-log-level": Mistake(["status"], {"CAPTIONER_LOG_LEVEL": "loud"}, "use DEBUG, INFO"),
    **{
        f"broker-down-{name}": Mistake(EVERY_COMMAND[name], BROKER_DOWN, "CAPTIONER_BROKER_URL")
        for name in ("enqueue", "backfill", "listen-webhook", "listen-sqs", "status",
                     "dead-list", "dead-requeue", "dead-purge")
    },
    # A probe's contract: 1 is "unhealthy", and a broker it cannot reach makes it so.
    "broker-down-health": Mistake(["health"], BROKER_DOWN, "fix CAPTIONER_BROKER_URL", code=1),
    **{
        f"broker-wrong-password-{name}": Mistake(
            EVERY_COMMAND[name], {"CAPTIONER_BROKER_URL": "redis://:wrong@{redis_host}/0"},
            "CAPTIONER_BROKER_URL",
        )
        for name in ("enqueue", "status", "dead-list")
    },
    # Accepts connections and never answers (a hung Redis, a black-holing proxy).
    **{
        f"broker-silent-{name}": Mistake(
            EVERY_COMMAND[name], {"CAPTIONER_BROKER_URL": "redis://{silent_host}/0"},
            "CAPTIONER_BROKER_URL",
        )
        for name in ("enqueue", "status", "dead-list")
    },
    "broker-no-password": Mistake(
        ["enqueue", "s3://photos/a.jpg"], {"CAPTIONER_BROKER_URL": "redis://{redis_host}/0"},
        "CAPTIONER_BROKER_URL",
    ),
    **{
        f"database-down-{name}": Mistake(
            EVERY_COMMAND[name],
            {"CAPTIONER_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{STOPPED}/captions"},
            "start the database or fix CAPTIONER_DATABASE_URL",
        )
        for name in ("results", "status", "db-upgrade", "backfill")
    },
    **{
        f"database-unknown-role-{name}": Mistake(
            EVERY_COMMAND[name], {"CAPTIONER_DATABASE_URL": "{postgres_nobody}"},
            "CAPTIONER_DATABASE_URL",
        )
        for name in ("results", "db-upgrade")
    },
    "store-down": Mistake(
        ["backfill", "s3://photos/one/"],
        {"CAPTIONER_S3_ENDPOINT_URL": f"http://127.0.0.1:{STOPPED}"},
        "start the object store or fix CAPTIONER_S3_ENDPOINT_URL",
    ),
    "no-aws-credentials": Mistake(["backfill", "s3://photos/one/"], NO_AWS, "AWS_ACCESS_KEY_ID"),
    "wrong-aws-secret": Mistake(
        ["backfill", "s3://photos/one/"], {"AWS_SECRET_ACCESS_KEY": "wrong"},
        "refused our credentials (SignatureDoesNotMatch): give boto3 credentials",
    ),
    "unknown-aws-key": Mistake(
        ["backfill", "s3://photos/one/"], {"AWS_ACCESS_KEY_ID": "nobody"},
        "refused our credentials (InvalidAccessKeyId): give boto3 credentials",
    ),
    "bucket-missing": Mistake(
        ["backfill", "s3://nosuchbucket/"], {"CAPTIONER_ALLOWED_BUCKETS": ""},
        "'nosuchbucket' does not exist: check the bucket name",
    ),
    "uri-scheme-refused": Mistake(
        ["backfill", "http://169.254.169.254/latest/"], {},
        "use s3://bucket/key or file:///path",
    ),
    "bucket-not-allowed": Mistake(
        ["backfill", "s3://forbidden/"], {}, "not in CAPTIONER_ALLOWED_BUCKETS",
    ),
    "backfill-of-files": Mistake(
        ["backfill", "file:///tmp/"], {}, "backfill lists S3 prefixes: s3://bucket/prefix",
    ),
    "from-file-missing": Mistake(
        ["enqueue", "--from-file", "{tmp}/missing.txt"], {},
        "cannot read --from-file {tmp}/missing.txt (No such file or directory)",
    ),
    "from-file-directory": Mistake(
        ["enqueue", "--from-file", "{tmp}"], {}, "give a readable file of URIs",
    ),
    "from-file-binary": Mistake(
        ["enqueue", "--from-file", "{tmp}/photo.jpg"], {}, "give a text file of URIs",
        files={"photo.jpg": b"\xff\xd8\xff\xe0" + bytes(range(128, 256))},
    ),
    "from-stdin-binary": Mistake(
        ["enqueue", "--from-file", "-"], {}, "is not UTF-8 text: give URIs as UTF-8",
        stdin=b"\xff\xfe\xfd not text",
    ),
    "uri-argument-not-utf8": Mistake(
        ["enqueue", "s3://photos/\udcff.jpg"], {}, "is not UTF-8 text: give URIs as UTF-8",
    ),
    "sqs-queue-missing": Mistake(
        ["listen", "sqs", "--queue-url", "{sqs}/123456789012/nosuch", "--endpoint-url", "{sqs}"],
        {}, "check --queue-url",
    ),
    "sqs-endpoint-down": Mistake(
        ["listen", "sqs", "--queue-url", "{sqs_queue}",
         "--endpoint-url", f"http://127.0.0.1:{STOPPED}"], {}, "check --endpoint-url",
    ),
    "sqs-no-credentials": Mistake(EVERY_COMMAND["listen-sqs"], NO_AWS, "AWS_ACCESS_KEY_ID"),
    "no-uris": Mistake(["enqueue"], {}, "give URIs as arguments or --from-file F"),
    "demo-folder-missing": Mistake(
        ["demo", "{tmp}/no-such-folder"], {}, "give a folder of images",
    ),
    "webhook-without-secret": Mistake(
        ["listen", "webhook", "--port", "0"], {"CAPTIONER_WEBHOOK_SECRET": None},
        "set CAPTIONER_WEBHOOK_SECRET",
    ),
}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-cli"), password="right").start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    directory = tmp_path_factory.mktemp("seaweed-cli")
    identities = directory / "s3.json"
    identities.write_text(json.dumps({"identities": [{
        "name": "captioner",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Write"],
    }]}))
    server = SeaweedS3(directory / "data", s3_config=identities)
    server.start()
    client = server.client()
    for bucket in ("photos", "forbidden"):
        client.create_bucket(Bucket=bucket)
    client.put_object(Bucket="photos", Key="one/a.jpg", Body=b"not really a jpeg")
    yield server
    assert server.process is not None
    os.killpg(server.process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def sqs_queue() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    yield boto3.client("sqs", endpoint_url=endpoint).create_queue(QueueName="uploads")["QueueUrl"]
    server.stop()


@pytest.fixture(scope="module")
def good_env(
    broker: RedisServer, store: SeaweedS3, postgres_url: str
) -> dict[str, str]:
    """An environment in which every command works: each mistake changes one thing."""
    ResultsStore(postgres_url).create_schema()
    inherited = {name: value for name, value in os.environ.items()
                 if not name.startswith("CAPTIONER_")}
    return {
        **inherited,
        "CAPTIONER_BROKER_URL": broker.url,
        "CAPTIONER_DATABASE_URL": postgres_url,
        "CAPTIONER_S3_ENDPOINT_URL": store.endpoint,
        "CAPTIONER_ALLOWED_BUCKETS": "photos",
        "CAPTIONER_WEBHOOK_SECRET": "secret",
        "CAPTIONER_METRICS_PORT": "0",
        "CAPTIONER_MODEL": "tiny-random-blip2",
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def silent_host() -> Iterator[str]:
    """A port whose kernel completes connections that nobody ever reads or answers."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as server:
        yield f"127.0.0.1:{server.getsockname()[1]}"


@pytest.fixture
def captioner(
    good_env: dict[str, str], broker: RedisServer, postgres_url: str, sqs_queue: str,
    *, silent_host: str, tmp_path: Path,
) -> Run:
    """Runs `python -m cli [extra] <the mistake's args>` in the good environment but for it."""
    fill = {
        "sqs_queue": sqs_queue,
        "sqs": sqs_queue.rsplit("/", 2)[0],  # http://host:port/<account>/<name>
        "tmp": str(tmp_path),
        "redis_host": f"127.0.0.1:{broker.port}",
        "silent_host": silent_host,
        "postgres_nobody": postgres_url.replace("postgres@", "nobody@", 1),
    }

    def run(mistake: Mistake, *extra: str) -> subprocess.CompletedProcess[str]:
        for name, data in mistake.files.items():
            (tmp_path / name).write_bytes(data)
        env = {**good_env, "CAPTIONER_DEMO_DIR": str(tmp_path / "demo")}
        for name, value in mistake.env.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value.format(**fill)
        args = [arg.format(**fill) for arg in mistake.args]
        done = subprocess.run(
            [sys.executable, "-m", "cli", *extra, *args], env=env, cwd=tmp_path,
            input=mistake.stdin, capture_output=True, timeout=90, check=False,
        )
        return subprocess.CompletedProcess(
            done.args, done.returncode, done.stdout.decode(errors="replace"),
            done.stderr.decode(errors="replace"),
        )

    return run


@pytest.mark.parametrize("name", MISTAKES)
def test_a_mistake_is_one_line_that_says_what_to_do(
    name: str, captioner: Run, tmp_path: Path
) -> None:
    mistake = MISTAKES[name]
    done = captioner(mistake)

    lines = done.stderr.splitlines()
    assert done.returncode == mistake.code, done.stderr
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    says = mistake.says.format(tmp=tmp_path)
    assert says in lines[0], lines[0]
    if mistake.code == 2:
        assert lines[0].startswith("captioner: error: "), lines[0]


@pytest.mark.parametrize(
    ("extra", "args", "env"),
    [
        (["--debug"], ["dead", "list"], {}),
        ([], ["dead", "list", "--debug"], {}),
        ([], ["dead", "list"], {"CAPTIONER_LOG_LEVEL": "DEBUG"}),
    ],
    ids=["--debug before the command", "--debug after it", "CAPTIONER_LOG_LEVEL=DEBUG"],
)
def test_debug_shows_the_traceback_above_the_line(
    extra: list[str], args: list[str], env: dict[str, str], captioner: Run
) -> None:
    done = captioner(Mistake(args, {**BROKER_DOWN, **env}, ""), *extra)

    assert done.returncode == 2, done.stderr
    assert "Traceback (most recent call last)" in done.stderr
    assert "redis.exceptions.ConnectionError" in done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("captioner: error: Redis unreachable"), last
    assert "CAPTIONER_BROKER_URL" in last
