"""Provisioning: every tag the code uses gets a limit, and provisioning is an idempotent upsert."""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect import Task
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

import skyvault.flows
import skyvault.tasks
from skyvault.config.provision import limit_name, provision_tag_limits, tag_limits
from skyvault.config.settings import DEFAULT_TAG_LIMITS, ConcurrencySettings, Settings

PACKAGE = Path(skyvault.tasks.__file__).parent.parent
ORCHESTRATION = (PACKAGE / "tasks", PACKAGE / "flows")

#: Functions that build a tag from a collection id, as the code may call them inside ``tags=``.
TAG_BUILDERS: dict[str, Any] = {}


def sample_settings() -> Settings:
    return Settings(collections={"demo-scenes": {}, "demo-dem": {}})


# --- which tags the code uses --------------------------------------------------------------------


def task_object_tags(packages: Iterable[Any]) -> set[str]:
    """The tags of every Prefect task defined in the modules of ``packages``."""
    tags: set[str] = set()
    for package in packages:
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            module = importlib.import_module(info.name)
            for obj in vars(module).values():
                if isinstance(obj, Task):
                    tags |= set(obj.tags)
    return tags


class _TagReader:
    """Reads the tags written in one module's source: ``tags=...`` arguments and ``tags(...)`` calls."""

    def __init__(self, source: str, where: str, collections: Iterable[str]) -> None:
        self.tree = ast.parse(source)
        self.where = where
        self.collections = list(collections)
        self.assigned: dict[str, list[ast.expr]] = {}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        self.assigned.setdefault(target.id, []).append(node.value)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
                self.assigned.setdefault(node.target.id, []).append(node.value)

    def tags(self) -> set[str]:
        found: set[str] = set()
        for node in ast.walk(self.tree):
            if not isinstance(node, ast.Call):
                continue
            for keyword in node.keywords:
                if keyword.arg == "tags":
                    found |= self.read(keyword.value, set())
            callee = node.func
            name = callee.attr if isinstance(callee, ast.Attribute) else getattr(callee, "id", None)
            if name == "tags":  # ``with prefect.tags("a", "b"):`` tags every run inside
                for arg in node.args:
                    found |= self.read(arg, set())
        return found

    def read(self, node: ast.expr, seen: set[str]) -> set[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, ast.List | ast.Tuple | ast.Set):
            return set().union(*(self.read(e, seen) for e in node.elts))
        if isinstance(node, ast.Starred):
            if isinstance(node.value, ast.Attribute) and node.value.attr == "tags":
                return set()  # a task's own tags: collected from the task objects
            return self.read(node.value, seen)
        if isinstance(node, ast.IfExp):
            return self.read(node.body, seen) | self.read(node.orelse, seen)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.BitOr):
            return self.read(node.left, seen) | self.read(node.right, seen)
        if isinstance(node, ast.Name) and node.id in self.assigned and node.id not in seen:
            values = self.assigned[node.id]
            return set().union(*(self.read(v, seen | {node.id}) for v in values))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in TAG_BUILDERS:
            build = TAG_BUILDERS[node.func.id]  # type: ignore[attr-defined]
            return {build(c) for c in self.collections}
        raise AssertionError(
            f"{self.where}:{node.lineno}: cannot tell which tags {ast.unparse(node)!r} stands for; "
            "write tags as string literals (or a name assigned literals in the module) so provisioning "
            "can be checked against them"
        )


def source_tags(folders: Iterable[Path], collections: Iterable[str]) -> set[str]:
    """Every tag written in the sources under ``folders``."""
    tags: set[str] = set()
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            tags |= _TagReader(path.read_text(encoding="utf-8"), str(path), collections).tags()
    return tags


def test_every_tag_the_code_uses_is_provisioned() -> None:
    settings = sample_settings()
    used = task_object_tags([skyvault.tasks, skyvault.flows]) | source_tags(
        ORCHESTRATION, settings.collections
    )
    provisioned = set(tag_limits(settings))
    missing = sorted(used - provisioned)
    assert not missing, f"tags used by skyvault's tasks and flows but never provisioned: {missing}"
    assert {"lts-read", "lts-write", "object-store-read", "object-store-write"} <= used


def test_the_tag_scan_sees_literal_tags_anywhere_in_a_module() -> None:
    source = """
tags = ["b-tag"] if flag else ["c-tag"]
extra: list[str] = ["d-tag"]

@task(name="t", tags=["a-tag"])
def t() -> None: ...

def f() -> None:
    t.with_options(tags=tags).submit()
    t.with_options(tags={*t.tags} | set(extra)).submit()
    with prefect.tags("e-tag"):
        t()
"""
    with pytest.raises(AssertionError, match="set\\(extra\\)"):
        _TagReader(source, "probe.py", ["coll"]).tags()
    readable = source.replace("| set(extra)", "| extra")
    found = _TagReader(readable, "probe.py", ["coll"]).tags()
    assert found == {"a-tag", "b-tag", "c-tag", "d-tag", "e-tag"}


def test_a_tag_computed_at_run_time_fails_the_scan() -> None:
    source = 'task.with_options(tags=[f"lts-{kind}"])\n'
    with pytest.raises(AssertionError, match=r"probe\.py:1: cannot tell which tags"):
        _TagReader(source, "probe.py", []).tags()


# --- what provisioning creates ------------------------------------------------------------------


def test_a_configured_limit_overrides_only_its_own_tag() -> None:
    s = Settings(concurrency={"tag_limits": {"lts-write": 2, "extra-io": 3}}, collections={"a": {}})
    limits = tag_limits(s)
    assert limits["lts-write"] == 2
    assert limits["extra-io"] == 3
    assert limits["catalog-write"] == DEFAULT_TAG_LIMITS["catalog-write"]
    assert limits["data-catalog"] == DEFAULT_TAG_LIMITS["data-catalog"]


def test_a_limit_of_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        ConcurrencySettings(tag_limits={"lts-write": 0})


def _server_limits(tags: Iterable[str]) -> dict[str, tuple[Any, ...]]:
    with get_client(sync_client=True) as client:
        out = {}
        for tag in tags:
            gcl = client.read_global_concurrency_limit_by_name(limit_name(tag))
            out[tag] = (gcl.id, gcl.limit, gcl.active, gcl.updated)
        return out


@pytest.fixture
def fresh_tag() -> Iterator[str]:
    """A tag no other test provisioned; the default limits are restored afterwards."""
    yield f"prov-{os.urandom(4).hex()}"
    provision_tag_limits(sample_settings())


@pytest.mark.usefixtures("prefect_harness")
def test_provisioning_creates_the_configured_limits(fresh_tag: str) -> None:
    s = Settings(
        concurrency={"tag_limits": {"lts-write": 2, "object-store-read": 7, fresh_tag: 2}},
        collections={"a": {}},
    )
    done = provision_tag_limits(s)
    assert fresh_tag in done.created
    on_server = _server_limits(tag_limits(s))
    assert {tag: limit for tag, (_, limit, _, _) in on_server.items()} == tag_limits(s)
    assert on_server["lts-write"][1] == 2
    assert on_server["object-store-read"][1] == 7
    assert on_server[fresh_tag][1] == 2
    assert all(active for _, _, active, _ in on_server.values())


@pytest.mark.usefixtures("prefect_harness")
def test_provisioning_twice_changes_nothing(fresh_tag: str) -> None:
    s = Settings(concurrency={"tag_limits": {fresh_tag: 1}})
    provision_tag_limits(s)
    before = _server_limits(tag_limits(s))
    again = provision_tag_limits(s)
    assert (again.created, again.updated) == ([], [])
    assert _server_limits(tag_limits(s)) == before


@pytest.mark.usefixtures("prefect_harness")
def test_provisioning_updates_a_changed_or_disabled_limit(fresh_tag: str) -> None:
    tileset = fresh_tag
    provision_tag_limits(Settings(concurrency={"tag_limits": {fresh_tag: 1}}))
    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(
            limit_name(tileset), GlobalConcurrencyLimitUpdate(active=False)
        )

    changed = Settings(concurrency={"tag_limits": {"lts-read": 3, fresh_tag: 1}})
    done = provision_tag_limits(changed)
    assert sorted(done.updated) == sorted(["lts-read", tileset])
    on_server = _server_limits(["lts-read", tileset])
    assert on_server["lts-read"][1:3] == (3, True)
    assert on_server[tileset][1:3] == (1, True)
