"""prefect.yaml: every deployment deploys a real flow to a pool the config job creates, in keys Prefect reads.

Prefect reads prefect.yaml with pydantic models that ignore unknown keys without a word, so a
misplaced key (``concurrency_limit`` under ``work_pool``, a typo in ``schedules``) would simply not
happen. These tests compare every key of the file with the models ``prefect deploy`` uses, and run
the file's deploy-time steps and schedules through Prefect's own code.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import importlib
import inspect
import itertools
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import Flow
from prefect.cli.deploy._models import (
    ConcurrencyLimitSpec,
    DeploymentConfig,
    PrefectYamlModel,
    RawScheduleConfig,
    WorkPoolConfig,
)
from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
from prefect.client.schemas.actions import DeploymentScheduleCreate
from prefect.client.schemas.objects import ConcurrencyLimitStrategy
from prefect.client.schemas.schedules import CronSchedule, RRuleSchedule
from prefect.deployments.steps.core import RESERVED_KEYWORDS
from prefect.server.schemas.schedules import CronSchedule as ServerCronSchedule
from prefect.server.schemas.schedules import RRuleSchedule as ServerRRuleSchedule
from prefect.utilities.templating import apply_values
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "prefect.yaml"
DOCKERFILE = ROOT / "runtime.Dockerfile"

#: (flow name, deployment name) -> work pool: what an operator runs with `prefect deployment run`.
EXPECTED = {
    ("ingest", "landing-zone"): "skyvault-ingest",
    ("ingest", "on-request"): "skyvault-ingest",
    ("process-product", "on-request"): "skyvault-ingest",
    ("seed", "on-request"): "skyvault-ingest",
    ("archive", "on-request"): "skyvault-archival",
    ("retrieve", "on-request"): "skyvault-retrieval",
    ("archive-job", "data-catalog"): "skyvault-archival",
    ("retrieve-job", "data-catalog"): "skyvault-retrieval",
    ("register", "on-request"): "skyvault-ingest",
    ("backup-catalog", "nightly"): "skyvault-ingest",
    ("restore-catalog", "on-request"): "skyvault-ingest",
    ("ingest-samples", "on-request"): "skyvault-ingest",
    ("seed-series", "on-request"): "skyvault-ingest",
}

#: The environment variable that sets the landing-zone poll interval when deploying.
INTERVAL_VARIABLE = "SKYVAULT_INGEST_INTERVAL_MINUTES"


def load(path: Path = PREFECT_YAML) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path} must hold a mapping"
    return data


def load_flow(entrypoint: str) -> Flow[..., Any]:
    module_name, _, attribute = entrypoint.partition(":")
    assert module_name, f"entrypoint {entrypoint!r} is not 'package.module:flow'"
    assert attribute, f"entrypoint {entrypoint!r} is not 'package.module:flow'"
    obj = getattr(importlib.import_module(module_name), attribute)
    assert isinstance(obj, Flow), f"{entrypoint} is a {type(obj).__name__}, not a Prefect flow"
    return obj


# --- which keys Prefect reads ----------------------------------------------------------------------


def _field_names(model: type[BaseModel]) -> set[str]:
    names: set[str] = set()
    for name, info in model.model_fields.items():
        names.add(name)
        if info.alias:
            names.add(info.alias)
    return names


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation admits, in order (``Optional[Union[int, Spec]]`` -> [Spec])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if isinstance(annotation, typing.ForwardRef | str):
        return []
    origin = typing.get_origin(annotation)
    if origin in (dict, typing.Dict):  # noqa: UP006 - both spellings occur in Prefect's models
        return []
    if origin in (typing.Union, types.UnionType, list, typing.List):  # noqa: UP006
        found: list[type[BaseModel]] = []
        for arg in typing.get_args(annotation):
            found += [m for m in _models_in(arg) if m not in found]
        return found
    return []


def _check_model(value: Any, model: type[BaseModel], where: str, problems: list[str]) -> None:
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_model(item, model, f"{where}[{i}]", problems)
        return
    if not isinstance(value, dict):
        return
    known = _field_names(model)
    for key, child in value.items():
        if key not in known:
            problems.append(f"{where}.{key}: not a key of {model.__name__} (Prefect ignores it)")
            continue
        field = next((f for n, f in model.model_fields.items() if key in (n, f.alias)), None)
        assert field is not None
        nested = _models_in(field.annotation)
        if key in ("build", "push", "pull"):
            _check_steps(child, f"{where}.{key}", problems)
        elif nested:
            # A union's first model is the shape the CLI reads (schedules: RawScheduleConfig).
            _check_model(child, nested[0], f"{where}.{key}", problems)


def _check_steps(steps: Any, where: str, problems: list[str]) -> None:
    if steps is None:
        return
    if isinstance(steps, dict):
        steps = [steps]
    for i, step in enumerate(steps):
        here = f"{where}[{i}]"
        if not isinstance(step, dict) or len(step) != 1:
            problems.append(f"{here}: a step is one mapping {{function: {{arguments}}}}")
            continue
        ((function, arguments),) = step.items()
        module_name, _, name = function.rpartition(".")
        try:
            step_function = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError, ValueError):
            problems.append(f"{here}: {function} is not an importable step")
            continue
        parameters = inspect.signature(step_function).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        for argument in arguments or {}:
            if argument not in parameters and argument not in RESERVED_KEYWORDS and not takes_any:
                problems.append(f"{here}.{argument}: not an argument of {function} (a TypeError at deploy)")


_SCHEDULE_MODEL = RawScheduleConfig  # the first model of DeploymentConfig.schedules' items


def unknown_keys(data: dict[str, Any]) -> list[str]:
    """Every key of a prefect.yaml document that the models ``prefect deploy`` reads do not know."""
    problems: list[str] = []
    _check_model(data, PrefectYamlModel, "prefect.yaml", problems)
    return problems


# --- the file --------------------------------------------------------------------------------------


def test_prefect_reads_the_file_as_written() -> None:
    data = load()
    model = PrefectYamlModel.model_validate(data)  # what `prefect deploy` does; invalid -> skipped
    assert len(model.deployments) == len(data["deployments"])
    assert unknown_keys(data) == []


def test_every_flow_is_deployed_to_its_pool() -> None:
    deployed: dict[tuple[str, str], str] = {}
    for deployment in load()["deployments"]:
        flow = load_flow(deployment["entrypoint"])
        key = (flow.name, deployment["name"])
        assert key not in deployed, f"deployment {key} is defined twice"
        deployed[key] = deployment["work_pool"]["name"]
    assert deployed == EXPECTED
    assert {flow for flow, _ in deployed} == {
        "ingest",
        "process-product",
        "seed",
        "archive",
        "retrieve",
        "archive-job",
        "retrieve-job",
        "register",
        "backup-catalog",
        "restore-catalog",
        "ingest-samples",
        "seed-series",
    }


@pytest.mark.parametrize("env_file", sorted((ROOT / "config").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_work_pool_is_one_the_config_job_creates(env_file: Path) -> None:
    pools = set(yaml.safe_load(env_file.read_text(encoding="utf-8"))["work_pools"])
    used = {d["work_pool"]["name"] for d in load()["deployments"]}
    assert used <= pools, f"pools {sorted(used - pools)} are not created by {env_file}"
    assert used == set(EXPECTED.values())


def test_the_image_holds_the_code_and_pull_only_sets_the_working_directory() -> None:
    data = load()
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(encoding="utf-8"), re.MULTILINE)
    assert data["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": workdirs[-1]}}]
    for deployment in data["deployments"]:
        assert not {"build", "push", "pull"} & set(deployment), deployment["name"]
        assert re.fullmatch(r"[\w.]+:\w+", deployment["entrypoint"]), "a module path, not a file"

        assert "image" not in deployment["work_pool"].get("job_variables", {}), "the pool names the image"


def test_no_block_or_variable_is_resolved_at_deploy_time() -> None:
    data = load()
    outside_pull = {k: v for k, v in data.items() if k != "pull"}
    text = yaml.safe_dump(outside_pull)
    assert "prefect.blocks." not in text
    assert "prefect.variables." not in text


def test_only_the_scheduled_flows_are_limited_to_one_run_at_a_time() -> None:
    limits = {
        (d["entrypoint"], d["name"]): d["concurrency_limit"]
        for d in load()["deployments"]
        if "concurrency_limit" in d
    }
    assert limits == {
        ("skyvault.flows.ingest:ingest", "landing-zone"): {"limit": 1, "collision_strategy": "CANCEL_NEW"},
        ("skyvault.flows.backup:backup_catalog", "nightly"): {"limit": 1, "collision_strategy": "CANCEL_NEW"},
    }
    for spec in limits.values():
        parsed = ConcurrencyLimitSpec.model_validate(spec)
        assert parsed.collision_strategy is not None
        ConcurrencyLimitStrategy(parsed.collision_strategy)  # a value the server accepts


async def _awaited(value: Any) -> Any:
    return await value


def _templated_schedule(monkeypatch: pytest.MonkeyPatch, deployment_name: str, **env: str | None) -> Any:
    """Run the file's build steps and template a deployment's schedule as ``prefect deploy`` does.

    Returns the schedule and whether it is created active.
    """
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    data = load()
    outputs: dict[str, Any] = {}
    for step in data["build"]:  # as run_steps does, without resolving blocks (that needs a server)
        ((function, arguments),) = copy.deepcopy(step).items()
        step_id = arguments.pop("id", None)
        arguments = apply_values(apply_values(arguments, outputs), dict(os.environ))
        module_name, _, name = function.rpartition(".")
        output = getattr(importlib.import_module(module_name), name)(**arguments)
        if inspect.isawaitable(output):
            output = asyncio.run(_awaited(output))
        if step_id:
            outputs[step_id] = output
        outputs.update(output)
    (deployment,) = [d for d in data["deployments"] if d["name"] == deployment_name]
    raw = DeploymentConfig.model_validate(deployment).model_dump(exclude_unset=True, mode="json")
    (schedule_config,) = apply_values(raw["schedules"], outputs)
    created = DeploymentScheduleCreate(**_schedule_config_to_deployment_schedule(schedule_config))
    return created.schedule, created.active


def _landing_zone_schedule(monkeypatch: pytest.MonkeyPatch, minutes: str | None) -> RRuleSchedule:
    schedule, _ = _templated_schedule(monkeypatch, "landing-zone", **{INTERVAL_VARIABLE: minutes})
    assert isinstance(schedule, RRuleSchedule)
    return schedule


@pytest.mark.parametrize(
    ("backend", "cron", "active", "hour"),
    [
        ("pgstac", None, True, 2),
        ("pgstac", "0 4 * * *", True, 4),
        ("static", None, False, 2),
        (None, None, False, 2),
    ],
)
def test_the_catalog_backup_runs_nightly_when_the_catalog_is_pgstac(
    monkeypatch: pytest.MonkeyPatch, backend: str | None, cron: str | None, active: bool, hour: int
) -> None:
    schedule, is_active = _templated_schedule(
        monkeypatch,
        "nightly",
        SKYVAULT_CATALOG__BACKEND=backend,
        SKYVAULT_CATALOG_BACKUP_CRON=cron,
    )
    assert isinstance(schedule, CronSchedule)
    assert is_active is active
    server_schedule = ServerCronSchedule(cron=schedule.cron, timezone=schedule.timezone)
    start = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
    dates = asyncio.run(server_schedule.get_dates(3, start=start))
    assert [d.astimezone(dt.UTC).hour for d in dates] == [hour] * 3
    assert {(b - a).total_seconds() for a, b in itertools.pairwise(dates)} == {86400}


@pytest.mark.parametrize(("minutes", "expected"), [(None, 15), ("5", 5), ("60", 60)])
def test_the_landing_zone_is_polled_at_the_interval_set_when_deploying(
    monkeypatch: pytest.MonkeyPatch, minutes: str | None, expected: int
) -> None:
    schedule = _landing_zone_schedule(monkeypatch, minutes)
    start = dt.datetime(2026, 6, 1, 12, 0, 1, tzinfo=dt.UTC)
    server_schedule = ServerRRuleSchedule(rrule=schedule.rrule, timezone=schedule.timezone)
    dates = asyncio.run(server_schedule.get_dates(3, start=start))
    gaps = {(b - a).total_seconds() for a, b in itertools.pairwise(dates)}
    assert gaps == {expected * 60}


# --- the key check itself -------------------------------------------------------------------------

MISPLACED: list[tuple[tuple[Any, ...], Any, str]] = [
    (("concurrency_limit_typo",), None, "prefect.yaml.concurrency_limit_typo"),
    (("deployments", 0, "schedule_interval"), 60, "prefect.yaml.deployments[0].schedule_interval"),
    (("deployments", 0, "work_pool", "concurrency_limit"), 1, "deployments[0].work_pool.concurrency_limit"),
    (("deployments", 0, "concurrency_limit", "strategy"), "ENQUEUE", "concurrency_limit.strategy"),
    (("deployments", 0, "schedules", 0, "every"), 60, "deployments[0].schedules[0].every"),
    (("deployments", 0, "work_pool", "job_variable"), {}, "deployments[0].work_pool.job_variable"),
    (
        ("pull", 0, "prefect.deployments.steps.set_working_directory", "dir"),
        "/x",
        "pull[0].dir: not an argument",
    ),
]


def _with(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    changed = copy.deepcopy(data)
    node: Any = changed
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return changed


@pytest.mark.parametrize(("path", "value", "reported"), MISPLACED, ids=lambda v: str(v))
def test_an_unknown_key_anywhere_fails_the_check(path: tuple[Any, ...], value: Any, reported: str) -> None:
    data = load()
    assert data["deployments"][0]["name"] == "landing-zone"  # the deployment with every section
    changed = _with(data, path, value)
    problems = unknown_keys(changed)
    assert len(problems) == 1, problems
    assert reported in problems[0]


def test_a_step_that_does_not_exist_fails_the_check() -> None:
    changed = _with(load(), ("pull", 0), {"prefect.deployments.steps.set_work_dir": {"directory": "/x"}})
    assert unknown_keys(changed) == [
        "prefect.yaml.pull[0]: prefect.deployments.steps.set_work_dir is not an importable step"
    ]


def test_every_model_the_check_uses_is_one_prefect_reads_with() -> None:
    fields = DeploymentConfig.model_fields
    assert _models_in(fields["work_pool"].annotation) == [WorkPoolConfig]
    assert _models_in(fields["concurrency_limit"].annotation) == [ConcurrencyLimitSpec]
    assert _models_in(fields["schedules"].annotation)[0] is _SCHEDULE_MODEL
    assert _models_in(PrefectYamlModel.model_fields["deployments"].annotation) == [DeploymentConfig]
