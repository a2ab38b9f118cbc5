"""Provisioning: every tag the code uses gets a limit, and provisioning is an idempotent upsert."""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import json
import os
import pkgutil
import subprocess
import sys
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect import Task
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitUpdate,
    VariableUpdate,
    WorkPoolCreate,
)
from prefect.exceptions import ObjectNotFound

import skyvault.flows
import skyvault.tasks
from skyvault.config.environment import CRASH_AUTOMATION, HEARTBEAT_ENV, load_environment
from skyvault.config.provision import HEARTBEAT_EVENT, limit_name, provision_tag_limits
from skyvault.config.provision_cli import main, provision
from skyvault.config.settings import (
    DEFAULT_TAG_LIMITS,
    ConcurrencySettings,
    Settings,
    collection_write_tag,
    tag_limits,
)
from tests.config.test_environment import CONFIG_DIR, POOLS, SECRET_VALUES, secret_files

PACKAGE = Path(skyvault.tasks.__file__).parent.parent
ORCHESTRATION = (PACKAGE / "tasks", PACKAGE / "flows")

#: Functions that build a tag from a collection id, as the code may call them inside ``tags=``.
TAG_BUILDERS: dict[str, Any] = {"collection_write_tag": collection_write_tag}


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


# --- the config job: skyvault-provision --env <env> ----------------------------------------------


def run_job(environ: dict[str, str], *flags: str, env: str = "dev") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = provision(
        env,
        CONFIG_DIR,
        environ=environ,
        dry_run="--dry-run" in flags,
        release_stale_slots="--release-stale-slots" in flags,
        out=out,
        err=err,
    )
    return code, out.getvalue(), err.getvalue()


def _remove_everything(environ: dict[str, str]) -> None:
    loaded = load_environment("dev", CONFIG_DIR, environ)
    with get_client(sync_client=True) as client:
        for name in loaded.variables:
            with contextlib.suppress(ObjectNotFound):
                client.delete_variable_by_name(name)
        blocks = [(s.block, "secret") for s in loaded.secrets]
        blocks += [(b.name, "s3-bucket") for b in loaded.s3_buckets]
        blocks += [(c.name, "aws-credentials") for c in loaded.aws_credentials]
        for name, slug in blocks:
            try:
                document = client.read_block_document_by_name(name, slug)
            except ObjectNotFound:
                continue
            client.delete_block_document(document.id)
        for pool in POOLS:
            with contextlib.suppress(ObjectNotFound):
                client.delete_work_pool(pool)
        for automation in client.read_automations_by_name(CRASH_AUTOMATION):
            client.delete_automation(automation.id)
    provision_tag_limits(sample_settings())


@pytest.fixture
def job_env(tmp_path: Path, prefect_harness: None) -> Iterator[dict[str, str]]:
    """The secret files of config/dev.yaml, and a server without anything the dev config makes."""
    environ = secret_files(tmp_path / "secrets")
    _remove_everything(environ)
    yield environ
    _remove_everything(environ)


def _server_state() -> dict[str, Any]:
    """What an operator would look at on the server, secrets revealed."""
    from prefect_aws import AwsCredentials, S3Bucket

    state: dict[str, Any] = {"variables": {}, "secrets": {}, "pools": {}, "limits": {}}
    with get_client(sync_client=True) as client:
        state["automations"] = [
            a.model_dump(mode="json") for a in client.read_automations_by_name(CRASH_AUTOMATION)
        ]
        for variable in client.read_variables(limit=200):
            if variable.name.startswith("skyvault_"):
                state["variables"][variable.name] = variable.value
        for document in client.read_block_documents_by_type("secret", include_secrets=True):
            if document.name and document.name.startswith("skyvault-"):
                state["secrets"][document.name] = document.data["value"]
        for pool in POOLS:
            try:
                wp = client.read_work_pool(pool)
            except ObjectNotFound:
                continue
            state["pools"][pool] = (wp.type, wp.base_job_template)
        for limit in client.read_global_concurrency_limits(limit=200):
            state["limits"][limit.name] = (limit.limit, limit.active)
        try:
            client.read_block_document_by_name("skyvault-dev-s3", "aws-credentials")
        except ObjectNotFound:
            state["aws"] = None
        else:
            creds: Any = AwsCredentials.load("skyvault-dev-s3")
            bucket: Any = S3Bucket.load("skyvault-dev-store")
            state["aws"] = {
                "key_id": creds.aws_access_key_id,
                "secret": creds.aws_secret_access_key.get_secret_value(),
                "endpoint": creds.aws_client_parameters.endpoint_url,
                "bucket": bucket.bucket_name,
                "bucket_credentials": bucket.credentials._block_document_name,
            }
    return state


def test_a_dry_run_prints_the_plan_and_changes_nothing(job_env: dict[str, str]) -> None:
    before = _server_state()
    code, out, _ = run_job(job_env, "--dry-run")
    assert code == 0, out
    assert "create variable skyvault_store" in out
    assert "create Secret block skyvault-store-secret-access-key" in out
    assert "create work pool skyvault-archival" in out
    assert "update tag limit tag:lts-write (limit 4 -> 2)" in out
    assert (
        f"create automation {CRASH_AUTOMATION} "
        "(Crashed after 90 s without a heartbeat, heartbeats every 30 s)" in out
    )
    assert "dry run: nothing changed" in out
    assert SECRET_VALUES["store.secret_access_key"] not in out
    assert _server_state() == before
    assert before["aws"] is None
    assert not before["pools"]
    assert not before["automations"]


def test_the_first_run_creates_everything_and_the_second_changes_nothing(job_env: dict[str, str]) -> None:
    code, out, err = run_job(job_env)
    assert code == 0, err
    assert "applied" in out
    state = _server_state()
    loaded = load_environment("dev", CONFIG_DIR, job_env)
    assert loaded.crash_detection is not None

    assert state["variables"]["skyvault_store"] == {
        "kind": "s3",
        "bucket": "skyvault-dev",
        "endpoint_url": "http://127.0.0.1:9000",
        "region": "us-east-1",
    }
    assert state["variables"]["skyvault_lts"] == {"root": "/mnt/lts"}
    assert "s2-l2a-browse" in state["variables"]["skyvault_collections"]
    assert not any("secret" in json.dumps(v) for v in state["variables"].values())

    assert state["secrets"] == {
        "skyvault-store-access-key-id": "AKIDEV0000",
        "skyvault-store-secret-access-key": "s3cr3t/with+symbols",
        "skyvault-data-catalog-password": "catalog pass",
    }
    assert state["aws"] == {
        "key_id": "AKIDEV0000",
        "secret": "s3cr3t/with+symbols",
        "endpoint": "http://127.0.0.1:9000",
        "bucket": "skyvault-dev",
        "bucket_credentials": "skyvault-dev-s3",
    }
    for tag, limit in loaded.tag_limits.items():
        assert state["limits"][f"tag:{tag}"] == (limit, True)
    assert state["limits"]["tag:lts-write"] == (2, True)

    assert set(state["pools"]) == POOLS
    for name, (kind, template) in state["pools"].items():
        assert kind == "docker"
        defaults = {k: p.get("default") for k, p in template["variables"]["properties"].items()}
        assert defaults["image"] == "skyvault/runtime:dev"
        assert defaults["image_pull_policy"] == "Never"
        assert defaults["network_mode"] == "host"
        assert defaults["auto_remove"] is True
        assert defaults["env"] == {
            "SKYVAULT_PREFECT_VARIABLES": "true",
            HEARTBEAT_ENV: str(loaded.crash_detection.heartbeat_seconds),
        }
        assert ("/mnt/lts:/mnt/lts" in defaults["volumes"]) == (name != "skyvault-ingest")
        assert template["job_configuration"]["network_mode"] == "{{ network_mode }}"

    code, out, _ = run_job(job_env)
    assert code == 0
    assert out.splitlines()[0] == "no changes"
    assert "applied" not in out
    assert _server_state() == state


def test_a_changed_value_is_updated_and_nothing_else(job_env: dict[str, str]) -> None:
    assert run_job(job_env)[0] == 0
    Path(job_env["SKYVAULT_STORE__SECRET_ACCESS_KEY_FILE"]).write_text("rotated\n")
    changed = {
        **job_env,
        "SKYVAULT_PROVISION__SETTINGS__STORE__BUCKET": "skyvault-dev-2",
        "SKYVAULT_PROVISION__SETTINGS__CONCURRENCY__TAG_LIMITS__LTS_WRITE": "3",
        "SKYVAULT_PROVISION__WORK_POOLS__SKYVAULT_INGEST__JOB_VARIABLES__IMAGE": "skyvault/runtime:dev2",
    }
    code, out, err = run_job(changed)
    assert code == 0, err
    changes = sorted(line for line in out.splitlines() if line.startswith(("create", "update")))
    assert changes == sorted(
        [
            "update Secret block skyvault-store-secret-access-key "
            f"(value changed, from {job_env['SKYVAULT_STORE__SECRET_ACCESS_KEY_FILE']})",
            "update AwsCredentials block skyvault-dev-s3 (changed: aws_secret_access_key)",
            "update S3Bucket block skyvault-dev-store (changed: bucket_name)",
            "update variable skyvault_store (changed: bucket)",
            "update variable skyvault_concurrency (changed: tag_limits)",
            "update tag limit tag:lts-write (limit 2 -> 3)",
            "update work pool skyvault-ingest (changed: image default)",
        ]
    )
    assert "rotated" not in out
    state = _server_state()
    assert state["secrets"]["skyvault-store-secret-access-key"] == "rotated"
    assert state["aws"]["secret"] == "rotated"
    assert state["aws"]["bucket"] == "skyvault-dev-2"
    assert state["variables"]["skyvault_store"]["bucket"] == "skyvault-dev-2"
    assert state["limits"]["tag:lts-write"] == (3, True)
    ingest = state["pools"]["skyvault-ingest"][1]["variables"]["properties"]
    assert ingest["image"]["default"] == "skyvault/runtime:dev2"
    assert state["pools"]["skyvault-archival"][1]["variables"]["properties"]["image"]["default"] == (
        "skyvault/runtime:dev"
    )
    assert run_job(changed)[1].splitlines()[0] == "no changes"


# --- crash detection: the automation and the heartbeats of the pools -----------------------------


def _crash_automations() -> list[Any]:
    with get_client(sync_client=True) as client:
        return [a for a in client.read_automations_by_name(CRASH_AUTOMATION) if a.name == CRASH_AUTOMATION]


def _pool_heartbeats() -> dict[str, str | None]:
    with get_client(sync_client=True) as client:
        return {
            pool: client.read_work_pool(pool)
            .base_job_template["variables"]["properties"]["env"]["default"]
            .get(HEARTBEAT_ENV)
            for pool in POOLS
        }


def test_the_config_job_creates_the_crash_automation_and_pool_heartbeats(job_env: dict[str, str]) -> None:
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    code, out, err = run_job(job_env)
    assert code == 0, err
    crash = load_environment("dev", CONFIG_DIR, job_env).crash_detection
    assert crash is not None
    (automation,) = _crash_automations()
    assert automation.enabled
    trigger = automation.trigger
    assert isinstance(trigger, EventTrigger)
    assert trigger.posture == Posture.Proactive
    assert trigger.within.total_seconds() == crash.missing_after_seconds
    assert trigger.threshold == 1
    assert trigger.for_each == {"prefect.resource.id"}
    assert trigger.after == {"prefect.flow-run.Running", HEARTBEAT_EVENT}
    assert trigger.expect == {
        HEARTBEAT_EVENT,
        "prefect.flow-run.Completed",
        "prefect.flow-run.Failed",
        "prefect.flow-run.Cancelled",
        "prefect.flow-run.Crashed",
    }
    match = trigger.match
    assert not isinstance(match, dict)
    assert match.model_dump() == {"prefect.resource.id": ["prefect.flow-run.*"]}
    (action,) = automation.actions
    assert isinstance(action, ChangeFlowRunState)
    assert action.state == StateType.CRASHED
    assert not action.force  # a run that already ended keeps its final state
    # the pools' flow containers send heartbeats at the rate the automation expects
    assert _pool_heartbeats() == dict.fromkeys(POOLS, str(crash.heartbeat_seconds))

    code, out, _ = run_job(job_env)
    assert code == 0
    assert out.splitlines()[0] == "no changes"
    assert [a.id for a in _crash_automations()] == [automation.id]


def test_a_changed_crash_threshold_updates_the_automation_and_the_pools(job_env: dict[str, str]) -> None:
    assert run_job(job_env)[0] == 0
    (before,) = _crash_automations()
    longer = {**job_env, "SKYVAULT_PROVISION__CRASH_DETECTION__MISSING_AFTER_SECONDS": "150"}

    code, out, _ = run_job(longer, "--dry-run")
    assert code == 0
    assert f"update automation {CRASH_AUTOMATION} (changed: description, trigger.within, actions)" in out
    assert _crash_automations()[0].trigger.model_dump() == before.trigger.model_dump()

    code, out, err = run_job(longer)
    assert code == 0, err
    changes = [line for line in out.splitlines() if line.startswith(("create", "update"))]
    assert changes == [
        f"update automation {CRASH_AUTOMATION} (changed: description, trigger.within, actions)"
    ]
    (after,) = _crash_automations()
    assert after.id == before.id
    assert after.trigger.within.total_seconds() == 150

    faster = {**longer, "SKYVAULT_PROVISION__CRASH_DETECTION__HEARTBEAT_SECONDS": "45"}
    code, out, err = run_job(faster)
    assert code == 0, err
    changes = sorted(line for line in out.splitlines() if line.startswith(("create", "update")))
    assert changes == sorted(
        [f"update work pool {pool} (changed: env default)" for pool in POOLS]
        + [f"update automation {CRASH_AUTOMATION} (changed: description)"]
    )
    assert _pool_heartbeats() == dict.fromkeys(POOLS, "45")
    assert run_job(faster)[1].splitlines()[0] == "no changes"


def test_a_paused_or_edited_crash_automation_is_put_back(job_env: dict[str, str]) -> None:
    from prefect.events.schemas.automations import AutomationCore

    assert run_job(job_env)[0] == 0
    (automation,) = _crash_automations()
    edited = AutomationCore.model_validate(
        {
            **automation.model_dump(exclude={"id", "owner_resource"}),
            "enabled": False,
            "trigger": {**automation.trigger.model_dump(), "expect": [HEARTBEAT_EVENT]},
        }
    )
    with get_client(sync_client=True) as client:
        client.update_automation(automation.id, edited)
    assert not _crash_automations()[0].enabled

    code, out, err = run_job(job_env)
    assert code == 0, err
    assert f"update automation {CRASH_AUTOMATION} (changed: enabled, trigger.expect)" in out
    (restored,) = _crash_automations()
    assert restored.enabled
    assert restored.model_dump(exclude={"id"}) == automation.model_dump(exclude={"id"})


def test_duplicate_crash_automations_are_named_not_guessed(job_env: dict[str, str]) -> None:
    assert run_job(job_env)[0] == 0
    (automation,) = _crash_automations()
    from prefect.events.schemas.automations import AutomationCore

    with get_client(sync_client=True) as client:
        second = client.create_automation(
            AutomationCore.model_validate(automation.model_dump(exclude={"id"}))
        )
    code, _, err = run_job(job_env)
    assert code == 1
    assert f"automation {CRASH_AUTOMATION} exists 2 times" in err
    assert str(second) in err
    assert "prefect automation delete" in err


@pytest.mark.parametrize("content", [None, ""])
def test_a_missing_or_empty_secret_file_fails_before_anything_is_created(
    job_env: dict[str, str], content: str | None
) -> None:
    before = _server_state()
    broken = Path(job_env["SKYVAULT_DATA_CATALOG__PASSWORD_FILE"])
    if content is None:
        broken.unlink()
    else:
        broken.write_text(content)
    code, out, err = run_job(job_env)
    assert code == 2
    assert "data_catalog.password" in err
    assert "skyvault-data-catalog-password" in err
    assert str(broken) in err
    assert out == ""
    assert _server_state() == before

    broken.write_text("catalog pass\n")  # fixed: the next run converges
    assert run_job(job_env)[0] == 0
    assert _server_state()["secrets"]["skyvault-data-catalog-password"] == "catalog pass"


def test_a_failure_exits_non_zero_naming_the_object(job_env: dict[str, str]) -> None:
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="skyvault-retrieval", type="process"))
    code, _, err = run_job(job_env)
    assert code == 1
    assert "work pool skyvault-retrieval exists with type 'process', not 'docker'" in err
    assert "prefect work-pool delete skyvault-retrieval" in err
    assert "skyvault_store" not in _server_state()["variables"]  # the plan failed: nothing was applied


def test_provisioning_needs_a_named_server(job_env: dict[str, str]) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: ""}):
        code, _, err = run_job(job_env)
    assert code == 2
    assert "PREFECT_API_URL is not set" in err


def test_release_stale_slots_frees_slots_without_a_live_holder_only(job_env: dict[str, str]) -> None:
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder

    assert run_job(job_env)[0] == 0
    with get_client(sync_client=True) as client:
        # a slot counted with no lease: what a restart of a server with in-memory leases leaves
        client.increment_concurrency_slots(names=["tag:lts-read"], slots=2, mode="concurrency")
        # a slot of a running task run, under a live lease
        live = client.increment_concurrency_slots_with_lease(
            names=["tag:lts-read"],
            slots=1,
            mode="concurrency",
            lease_duration=300,
            holder=ConcurrencyLeaseHolder(type="task_run", id=uuid.uuid4()),
        ).json()["lease_id"]
    try:
        code, out, _ = run_job(job_env, "--dry-run", "--release-stale-slots")
        assert code == 0
        assert "tag:lts-read: freed 2 slot(s) held with no live lease" in out
        assert "tag:lts-read: 1 slot(s) held by running task runs" in out
        assert "repossessor" in out  # the test server keeps its leases in memory: not visible here
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name("tag:lts-read").active_slots == 1

        code, out, _ = run_job(job_env, "--release-stale-slots")
        assert "freed" not in out
        assert "tag:lts-read: 1 slot(s) held by running task runs" in out
    finally:
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(uuid.UUID(live))
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("tag:lts-read").active_slots == 0
    assert "no tag slots held" in run_job(job_env, "--release-stale-slots")[1]


def test_main_reads_the_process_environment(
    job_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in job_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SKYVAULT_PROVISION__SETTINGS__STORE__BUCKET", "from-process-env")
    assert main(["--env", "dev", "--config-dir", str(CONFIG_DIR), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "create S3Bucket block skyvault-dev-store (bucket from-process-env" in out
    assert "dry run: nothing changed" in out


# --- what a flow run reads back -----------------------------------------------------------------

FLOW_CONTAINER = """
import json
from prefect import flow
from skyvault.config.settings import get_settings

@flow
def show() -> dict:
    s = get_settings()
    return {
        "bucket": s.store.bucket,
        "endpoint": s.store.endpoint_url,
        "lts": str(s.lts.root),
        "tag_limits": s.concurrency.tag_limits,
        "key_id": s.store.access_key_id.get_secret_value(),
        "secret": s.store.secret_access_key.get_secret_value(),
        "password": s.data_catalog.password.get_secret_value(),
        "token": s.data_catalog.token,
    }

print(json.dumps(show()))
"""


def test_a_flow_run_reads_secrets_from_blocks_and_the_rest_from_variables(job_env: dict[str, str]) -> None:
    from prefect.settings import PREFECT_API_URL

    assert run_job(job_env)[0] == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKYVAULT_", "PREFECT_"))}
    env.update(
        PREFECT_API_URL=str(PREFECT_API_URL.value()),
        SKYVAULT_PREFECT_VARIABLES="true",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    done = subprocess.run(
        [sys.executable, "-c", FLOW_CONTAINER], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {
        "bucket": "skyvault-dev",
        "endpoint": "http://127.0.0.1:9000",
        "lts": "/mnt/lts",
        "tag_limits": load_environment("dev", CONFIG_DIR, job_env).settings.concurrency.tag_limits,
        "key_id": "AKIDEV0000",
        "secret": "s3cr3t/with+symbols",
        "password": "catalog pass",
        "token": None,
    }


def test_a_secret_put_into_a_variable_is_not_used(
    job_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert run_job(job_env)[0] == 0
    with get_client(sync_client=True) as client:
        for name, secrets in [
            ("skyvault_store", {"secret_access_key": "from-variable", "access_key_id": "AKID-variable"}),
            ("skyvault_data_catalog", {"token": "tok-variable"}),
        ]:
            variable = client.read_variable_by_name(name)
            assert variable is not None
            assert isinstance(variable.value, dict)
            client.update_variable(VariableUpdate(name=name, value={**variable.value, **secrets}))
    monkeypatch.setenv("SKYVAULT_PREFECT_VARIABLES", "true")
    s = Settings()
    assert s.store.bucket == "skyvault-dev"  # the variable is read...
    assert s.store.secret_access_key is not None  # ...but its secrets are not
    assert s.store.secret_access_key.get_secret_value() == "s3cr3t/with+symbols"
    assert s.store.access_key_id is not None
    assert s.store.access_key_id.get_secret_value() == "AKIDEV0000"
    assert s.data_catalog.username == "skyvault-ingestor"
    assert s.data_catalog.token is None  # no Secret block: no token at all
    assert "Prefect variable skyvault_data_catalog holds the secret data_catalog.token" in caplog.text
    assert "tok-variable" not in caplog.text
    assert "from-variable" not in caplog.text
