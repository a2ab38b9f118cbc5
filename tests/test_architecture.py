"""The import contract: the domain library never imports Prefect; tasks/ holds only task adapters."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import Task

import skyvault

PACKAGE = Path(skyvault.__file__).parent
DOMAIN_PACKAGES = ["storage", "discovery", "cog", "stac", "catalog", "tiles", "archive", "scicat"]
#: Where Prefect may be imported: the orchestration layer, provisioning and the entry points. Every
#: other module is the domain library, plus the settings model the domain library uses.
ORCHESTRATION = (
    "skyvault.tasks",
    "skyvault.flows",
    "skyvault.config",
    "skyvault.cli",
    "skyvault.demo",
    "skyvault.gateway.prefect_runs",
)
PREFECT_FREE_CONFIG = ["skyvault.config.settings", "skyvault.config.collections"]

#: The most statements a plain function in a tasks/ module may have (a name builder, a retry
#: condition, a task with options): anything longer is work that belongs in the domain library.
HELPER_MAX_STATEMENTS = 8

# Imports each module in turn and records, for the first one that brings in Prefect, the chain of
# skyvault modules that imported it.
PROBE = """
import importlib, json, sys, traceback

class Watch:
    chain = None
    def find_spec(self, name, path=None, target=None):
        if name == "prefect" and Watch.chain is None:
            Watch.chain = [f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()
                           if "/skyvault/" in f.filename]
        return None

sys.meta_path.insert(0, Watch())
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
    if "prefect" in sys.modules:
        print(json.dumps({"module": name, "chain": Watch.chain}))
        break
else:
    print(json.dumps(None))
"""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def domain_modules() -> list[str]:
    """Every skyvault module that must import without Prefect."""
    names = sorted(module_name(p) for p in PACKAGE.rglob("*.py"))
    outside = [n for n in names if not any(n == o or n.startswith(o + ".") for o in ORCHESTRATION)]
    return outside + PREFECT_FREE_CONFIG


def first_prefect_import(modules: list[str]) -> dict[str, Any] | None:
    """Import ``modules`` in a fresh interpreter; the first one that loads Prefect and how, or None."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(modules)],
        capture_output=True,
        text=True,
        check=True,
        cwd=PACKAGE.parent,
    )
    found: dict[str, Any] | None = json.loads(out.stdout.strip().splitlines()[-1])
    return found


def test_every_domain_package_is_checked() -> None:
    modules = domain_modules()
    for package in DOMAIN_PACKAGES:
        assert f"skyvault.{package}" in modules
    for name in ["errors", "models", "ids", "items", "checksum", "storage.store", "catalog.static"]:
        assert f"skyvault.{name}" in modules
    assert not [m for m in modules if m.startswith(("skyvault.tasks", "skyvault.flows"))]


def test_domain_modules_import_without_prefect() -> None:
    found = first_prefect_import(domain_modules())
    assert found is None, f"importing {found['module']} loads prefect, via {found['chain']}"


def test_the_check_notices_a_domain_module_that_imports_prefect() -> None:
    found = first_prefect_import(["skyvault.ids", "skyvault.tasks.policy", "skyvault.models"])
    assert found is not None
    assert found["module"] == "skyvault.tasks.policy"
    assert any("skyvault/tasks/policy.py" in step for step in found["chain"])


def _statements(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return sum(isinstance(node, ast.stmt) for stmt in body for node in ast.walk(stmt))


def not_adapters(source: str, where: str, tasks: set[str]) -> list[str]:
    """What in one tasks/ module is neither a task adapter nor a tiny helper, as readable lines.

    ``tasks`` names the module's top-level Prefect task objects.
    """
    problems = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            problems.append(
                f"{where}:{node.lineno}: class {node.name} (classes belong in the domain library)"
            )
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name not in tasks:
            size = _statements(node)
            loops = any(
                isinstance(n, ast.For | ast.AsyncFor | ast.While | ast.With | ast.AsyncWith)
                for n in ast.walk(node)
            )
            if size > HELPER_MAX_STATEMENTS or loops:
                problems.append(
                    f"{where}:{node.lineno}: {node.name}() is neither a task nor a tiny helper "
                    f"({size} statements{', loops or with-blocks' if loops else ''})"
                )
    return problems


def test_task_modules_hold_only_task_adapters() -> None:
    problems = []
    for path in sorted((PACKAGE / "tasks").glob("*.py")):
        module = importlib.import_module(module_name(path))
        tasks = {name for name, obj in vars(module).items() if isinstance(obj, Task)}
        where = str(path.relative_to(PACKAGE.parent))
        problems += not_adapters(path.read_text(encoding="utf-8"), where, tasks)
    assert not problems, "tasks/ holds only @task adapters:\n" + "\n".join(problems)


def test_the_adapter_check_notices_work_in_a_tasks_module() -> None:
    source = """
@task(name="read")
def read(key): return store.get(key)

def seeder(c):
    \"\"\"A task with options.\"\"\"
    return read.with_options(tags=[c])

class Cache:
    pass

def merge(parts):
    out = []
    for p in parts:
        out.append(p)
    return out
"""
    problems = not_adapters(source, "probe.py", {"read"})
    assert problems == [
        "probe.py:9: class Cache (classes belong in the domain library)",
        "probe.py:12: merge() is neither a task nor a tiny helper (4 statements, loops or with-blocks)",
    ]
