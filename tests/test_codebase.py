"""Checks on the code itself: one place for Redis key names and for Redis clients."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from captioning import keys
from captioning.broker import celery_config
from captioning.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("captioning", "producer", "workers", "cli")
#: How our keys look (`captioner: error: ...` is a message, not a key).
KEY_LIKE = re.compile(r"captioner:\S")
KEYS_MODULE = ROOT / "captioning" / "keys.py"
CONNECTIONS_MODULE = ROOT / "captioning" / "connections.py"


def shipped_modules() -> Iterator[tuple[Path, ast.Module]]:
    for package in SHIPPED:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path, ast.parse(path.read_text(), filename=str(path))


def key_names() -> dict[str, str]:
    return {
        name: value for name, value in vars(keys).items()
        if name.isupper() and isinstance(value, str)
    }


def test_redis_key_names_are_written_only_in_keys_module() -> None:
    names = key_names()
    assert {"UNACKED_KEY", "DEAD_QUEUE", "HEALTH_PREFIX"} <= set(names)
    values = set(names.values())
    prefixes = tuple(value for name, value in names.items() if name.endswith("_PREFIX"))
    found = []
    for path, tree in shipped_modules():
        if path == KEYS_MODULE:
            continue
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            text = node.value
            if text in values or text.startswith(prefixes) or KEY_LIKE.match(text):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text!r}")
    assert found == [], "Redis key names belong in captioning/keys.py"


def test_key_constants_are_defined_only_in_keys_module() -> None:
    found = []
    for path, tree in shipped_modules():
        if path == KEYS_MODULE:
            continue
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                if isinstance(target, ast.Name) and target.id.endswith(("_KEY", "_PREFIX")):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {target.id}")
    assert found == []


def test_kombu_is_told_the_unacked_key_we_read() -> None:
    transport = celery_config(Settings())["broker_transport_options"]
    assert transport["unacked_key"] == keys.UNACKED_KEY


def bare_client_calls(tree: ast.Module) -> Iterator[int]:
    """Line numbers of `Redis(...)`, `Redis.from_url(...)`, `redis.from_url(...)`,
    `StrictRedis(...)` and `ConnectionPool(...)`, however redis was imported."""
    constructors = {"Redis", "StrictRedis", "ConnectionPool"}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = func.value if isinstance(func, ast.Attribute) else None
        owner_name = (
            owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
        )
        if name in constructors or (name == "from_url" and owner_name in {"redis", *constructors}):
            yield node.lineno


def test_bare_client_check_sees_every_spelling() -> None:
    source = (
        "import redis\nfrom redis import Redis\n"
        "a = redis.Redis.from_url(u)\nb = Redis(host='x')\nc = redis.from_url(u)\n"
        "d = redis.StrictRedis()\ne = redis.ConnectionPool.from_url(u)\nf = other.from_url(u)\n"
    )
    assert list(bare_client_calls(ast.parse(source))) == [3, 4, 5, 6, 7]
