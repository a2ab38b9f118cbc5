"""The config job: provision a Prefect server for skyvault, idempotently.

Prefect treats a tag without a limit as unlimited, so every tag a skyvault task carries gets one
here: the tags of ``settings.concurrency.tag_limits`` (``lts-read``, ``lts-write``,
``object-store-read``, ``object-store-write``, ``catalog-write``, ``data-catalog``). A tag limit
is the global concurrency limit named ``tag:<tag>``. :func:`provision_tag_limits` upserts them: a
missing limit is created, one with another value or switched off is updated, and running it
again changes nothing. The ``skyvault`` command runs it before every flow.

For a server that deployments use, :func:`plan_environment` compares an
:class:`~skyvault.config.environment.Environment` (``config/<env>.yaml``) with the server and
returns a :class:`Plan`: per variable, Secret block, prefect-aws block, tag limit, work pool and
the crash-detection automation, whether it is created, updated or left as it is.
:func:`apply_plan` carries out the changes in that order; a failure names the object it was
changing. ``skyvault-provision``
(:mod:`skyvault.config.provision_cli`) is the command around them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
    VariableCreate,
    VariableUpdate,
    WorkPoolCreate,
    WorkPoolUpdate,
)
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from pydantic import SecretStr

from skyvault.config.environment import (
    CRASH_AUTOMATION,
    AwsCredentialsBlock,
    CrashDetection,
    Environment,
    S3BucketBlock,
    SecretValue,
    WorkPoolConfig,
)
from skyvault.config.settings import Settings, tag_limits
from skyvault.errors import SkyvaultError

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.events.schemas.automations import AutomationCore
    from prefect_aws import AwsCredentials


class ProvisioningError(SkyvaultError):
    """Reading or changing an object on the Prefect server failed; names the object."""


def limit_name(tag: str) -> str:
    """The name of the global concurrency limit Prefect applies to task runs tagged ``tag``."""
    return f"tag:{tag}"


# --- plans ----------------------------------------------------------------------------------------

Action = Literal["create", "update", "leave"]
Apply = Callable[["SyncPrefectClient"], None]


@dataclass(frozen=True)
class Step:
    """One object on the server and what provisioning does to it (``detail`` never holds a secret)."""

    kind: str
    name: str
    action: Action
    detail: str = ""
    run: Apply | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        text = f"{self.action} {self.kind} {self.name}"
        return f"{text} ({self.detail})" if self.detail else text


@dataclass(frozen=True)
class Plan:
    """Every step of provisioning one environment, in the order they are applied."""

    steps: tuple[Step, ...]

    @property
    def changes(self) -> tuple[Step, ...]:
        """The steps that create or update something."""
        return tuple(s for s in self.steps if s.action != "leave")

    def render(self) -> str:
        """One line per change, or ``no changes``; then how many objects are already right."""
        lines = [str(s) for s in self.changes] or ["no changes"]
        unchanged = len(self.steps) - len(self.changes)
        lines.append(f"{len(self.changes)} to change, {unchanged} unchanged")
        return "\n".join(lines)


def plan_environment(env: Environment) -> Plan:
    """Compare ``env`` with the current Prefect API; changes nothing.

    Raises:
        ProvisioningError: the server could not be read, or holds an object that cannot be
            changed into the configured one (a work pool of another type); names the object.

    """
    steps: list[Step] = []
    with get_client(sync_client=True) as client:
        for secret in env.secrets:
            steps.append(_guard("Secret block", secret.block, _plan_secret, client, secret))
        for creds in env.aws_credentials:
            steps.append(_guard("AwsCredentials block", creds.name, _plan_aws_credentials, client, creds))
        for bucket in env.s3_buckets:
            steps.append(_guard("S3Bucket block", bucket.name, _plan_s3_bucket, client, bucket))
        for name, value in env.variables.items():
            steps.append(_guard("variable", name, _plan_variable, client, name, value))
        for tag, limit in sorted(env.tag_limits.items()):
            steps.append(_guard("tag limit", limit_name(tag), _plan_tag_limit, client, tag, limit))
        for pool in env.work_pools:
            steps.append(_guard("work pool", pool.name, _plan_work_pool, client, pool))
        if env.crash_detection is not None:
            steps.append(
                _guard("automation", CRASH_AUTOMATION, _plan_automation, client, env.crash_detection)
            )
    return Plan(tuple(steps))


def apply_plan(plan: Plan) -> list[Step]:
    """Carry out the changes of ``plan`` in order; the steps done.

    Raises:
        ProvisioningError: a change failed; names the object. The steps before it are done, and
            running the config job again picks up where it stopped.

    """
    done: list[Step] = []
    with get_client(sync_client=True) as client:
        for step in plan.changes:
            if step.run is None:  # pragma: no cover - every change carries its action
                continue
            try:
                step.run(client)
            except Exception as e:
                raise ProvisioningError(f"could not {step.action} {step.kind} {step.name}: {e}") from e
            done.append(step)
    return done


def _guard(kind: str, name: str, plan: Callable[..., Step], *args: Any) -> Step:
    try:
        return plan(*args)
    except ProvisioningError:
        raise
    except Exception as e:
        raise ProvisioningError(f"could not read {kind} {name}: {e}") from e


def _read_block(client: SyncPrefectClient, name: str, slug: str) -> dict[str, Any] | None:
    try:
        document = client.read_block_document_by_name(name, slug, include_secrets=True)
    except ObjectNotFound:
        return None
    return dict(document.data)


# --- Secret blocks --------------------------------------------------------------------------------


def _plan_secret(client: SyncPrefectClient, secret: SecretValue) -> Step:
    existing = _read_block(client, secret.block, "secret")
    wanted = secret.value.get_secret_value()

    def save(_: SyncPrefectClient) -> None:
        from prefect.blocks.system import Secret

        Secret(value=SecretStr(wanted)).save(secret.block, overwrite=True)

    source = f"from {secret.file}"
    if existing is None:
        return Step("Secret block", secret.block, "create", source, save)
    if existing.get("value") != wanted:
        return Step("Secret block", secret.block, "update", f"value changed, {source}", save)
    return Step("Secret block", secret.block, "leave")


# --- prefect-aws blocks ---------------------------------------------------------------------------


def _credentials_block(spec: AwsCredentialsBlock) -> AwsCredentials:
    from prefect_aws import AwsClientParameters, AwsCredentials

    return AwsCredentials(
        aws_access_key_id=spec.aws_access_key_id.get_secret_value() if spec.aws_access_key_id else None,
        aws_secret_access_key=spec.aws_secret_access_key,
        region_name=spec.region_name,
        aws_client_parameters=AwsClientParameters(endpoint_url=spec.endpoint_url),
    )


def _block_data(block: Any) -> dict[str, Any]:
    fields = set(type(block).model_fields)
    data: dict[str, Any] = block.model_dump(mode="json", include=fields, context={"include_secrets": True})
    return data


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return "changed: " + ", ".join(keys)


def _plan_aws_credentials(client: SyncPrefectClient, spec: AwsCredentialsBlock) -> Step:
    from prefect_aws import AwsCredentials

    kind = "AwsCredentials block"
    wanted = _credentials_block(spec)

    def save(_: SyncPrefectClient) -> None:
        wanted.save(spec.name, overwrite=True)

    if _read_block(client, spec.name, AwsCredentials.get_block_type_slug()) is None:
        return Step(kind, spec.name, "create", "", save)
    old, new = _block_data(AwsCredentials.load(spec.name)), _block_data(wanted)
    if old != new:
        return Step(kind, spec.name, "update", _differences(old, new), save)
    return Step(kind, spec.name, "leave")


def _plan_s3_bucket(client: SyncPrefectClient, spec: S3BucketBlock) -> Step:
    from prefect_aws import AwsCredentials, S3Bucket

    kind = "S3Bucket block"
    wanted = {"bucket_name": spec.bucket_name, "bucket_folder": spec.bucket_folder}

    def save(_: SyncPrefectClient) -> None:
        credentials = AwsCredentials.load(spec.credentials)  # saved: the bucket refers to it
        S3Bucket(credentials=credentials, **wanted).save(spec.name, overwrite=True)

    detail = f"bucket {spec.bucket_name}, credentials {spec.credentials}"
    if _read_block(client, spec.name, S3Bucket.get_block_type_slug()) is None:
        return Step(kind, spec.name, "create", detail, save)
    existing: Any = S3Bucket.load(spec.name)
    old = {key: getattr(existing, key) for key in wanted}
    old_credentials = getattr(existing.credentials, "_block_document_name", None)
    if old != wanted or old_credentials != spec.credentials:
        old["credentials"], new = old_credentials, {**wanted, "credentials": spec.credentials}
        return Step(kind, spec.name, "update", _differences(old, new), save)
    return Step(kind, spec.name, "leave")


# --- variables ------------------------------------------------------------------------------------


def _plan_variable(client: SyncPrefectClient, name: str, value: Any) -> Step:
    existing = client.read_variable_by_name(name)
    if existing is None:

        def create(c: SyncPrefectClient) -> None:
            c.create_variable(VariableCreate(name=name, value=value))

        return Step("variable", name, "create", "", create)
    if existing.value != value:

        def update(c: SyncPrefectClient) -> None:
            c.update_variable(VariableUpdate(name=name, value=value))

        old, new = existing.value, value
        detail = _differences(old, new) if isinstance(old, dict) and isinstance(new, dict) else "value"
        return Step("variable", name, "update", detail, update)
    return Step("variable", name, "leave")


# --- tag limits -----------------------------------------------------------------------------------


def _plan_tag_limit(client: SyncPrefectClient, tag: str, limit: int) -> Step:
    name = limit_name(tag)

    def update(c: SyncPrefectClient) -> None:
        c.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=limit, active=True))

    def create(c: SyncPrefectClient) -> None:
        try:
            c.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=limit, active=True)
            )
        except ObjectAlreadyExists:  # another process created it since it was read
            update(c)

    try:
        existing = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        return Step("tag limit", name, "create", f"limit {limit}", create)
    if existing.limit != limit or not existing.active:
        was = f"{existing.limit}" + ("" if existing.active else ", inactive")
        return Step("tag limit", name, "update", f"limit {was} -> {limit}", update)
    return Step("tag limit", name, "leave")


@dataclass(frozen=True)
class Provisioned:
    """What provisioning did: the limits by tag, and which tags it created or changed."""

    limits: dict[str, int]
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)


def provision_tag_limits(settings: Settings) -> Provisioned:
    """Create or update the tag concurrency limits on the current Prefect API (an upsert)."""
    limits = tag_limits(settings)
    created: list[str] = []
    updated: list[str] = []
    with get_client(sync_client=True) as client:
        for tag, limit in sorted(limits.items()):
            step = _plan_tag_limit(client, tag, limit)
            if step.run is not None:
                step.run(client)
                (created if step.action == "create" else updated).append(tag)
    return Provisioned(limits=limits, created=created, updated=updated)


# --- work pools -----------------------------------------------------------------------------------


def _plan_work_pool(client: SyncPrefectClient, pool: WorkPoolConfig) -> Step:
    try:
        existing = client.read_work_pool(pool.name)
    except ObjectNotFound:

        def create(c: SyncPrefectClient) -> None:
            c.create_work_pool(
                WorkPoolCreate(
                    name=pool.name,
                    type=pool.type,
                    base_job_template=pool.base_job_template,
                    description=pool.description,
                    concurrency_limit=pool.concurrency_limit,
                )
            )

        return Step("work pool", pool.name, "create", f"type {pool.type}, {pool.template_file}", create)
    if existing.type != pool.type:
        raise ProvisioningError(
            f"work pool {pool.name} exists with type {existing.type!r}, not {pool.type!r}; a pool's type "
            f"cannot change: delete it (prefect work-pool delete {pool.name}) and run again"
        )
    changed = _template_differences(existing.base_job_template, pool.base_job_template)
    if existing.description != pool.description:
        changed.append("description")
    if existing.concurrency_limit != pool.concurrency_limit:
        changed.append("concurrency_limit")
    if not changed:
        return Step("work pool", pool.name, "leave")

    def update(c: SyncPrefectClient) -> None:
        c.update_work_pool(
            pool.name,
            WorkPoolUpdate(
                base_job_template=pool.base_job_template,
                description=pool.description,
                concurrency_limit=pool.concurrency_limit,
            ),
        )

    return Step("work pool", pool.name, "update", "changed: " + ", ".join(changed), update)


def _template_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    if old == new:
        return []
    old_props = old.get("variables", {}).get("properties", {})
    new_props = new.get("variables", {}).get("properties", {})
    defaults = sorted(
        f"{key} default"
        for key in old_props.keys() | new_props.keys()
        if old_props.get(key, {}).get("default") != new_props.get(key, {}).get("default")
    )
    rest_old = _without_defaults(old)
    rest_new = _without_defaults(new)
    return defaults + (["base job template"] if rest_old != rest_new else [])


def _without_defaults(template: dict[str, Any]) -> dict[str, Any]:
    out = dict(template)
    variables = dict(out.get("variables", {}))
    variables["properties"] = {
        key: {k: v for k, v in prop.items() if k != "default"}
        for key, prop in variables.get("properties", {}).items()
    }
    out["variables"] = variables
    return out


# --- crash detection -----------------------------------------------------------------------------

#: What a running flow run sends every `heartbeat_seconds`; it and a final state end its silence.
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
_FINAL_EVENTS = tuple(
    f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")
)


def crash_automation(crash: CrashDetection) -> AutomationCore:
    """The automation that marks a flow run Crashed when it stays silent too long.

    A proactive event trigger, evaluated for each flow run: once the run is ``Running`` or has sent a
    heartbeat, it expects another heartbeat or a final state within ``missing_after_seconds``; when
    none comes, the run's state is changed to Crashed.
    """
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    within = crash.missing_after_seconds
    return AutomationCore(
        name=CRASH_AUTOMATION,
        description=(
            f"Marks a flow run Crashed when it sends no heartbeat for {within} s while running "
            f"(flow runs send one every {crash.heartbeat_seconds} s): its worker, container or "
            "host died. Managed by skyvault-provision."
        ),
        enabled=True,
        tags=[],
        trigger=EventTrigger(
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({}),
            after={"prefect.flow-run.Running", HEARTBEAT_EVENT},
            expect={HEARTBEAT_EVENT, *_FINAL_EVENTS},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=(
                    f"no heartbeat for {within} s: the flow run's process is gone "
                    f"(marked by the automation {CRASH_AUTOMATION})"
                ),
            )
        ],
        actions_on_trigger=[],
        actions_on_resolve=[],
    )


_AUTOMATION_FIELDS = (
    "description",
    "enabled",
    "tags",
    "trigger",
    "actions",
    "actions_on_trigger",
    "actions_on_resolve",
)


def _automation_data(automation: AutomationCore) -> dict[str, Any]:
    data = automation.model_dump(mode="json", include=set(_AUTOMATION_FIELDS))
    for key in ("after", "expect", "for_each"):
        data["trigger"][key] = sorted(data["trigger"].get(key) or [])
    return data


def _automation_differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed: list[str] = []
    for key in _AUTOMATION_FIELDS:
        if key == "trigger" and isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
            o, n = old[key], new[key]
            changed += [f"trigger.{k}" for k in sorted(o.keys() | n.keys()) if o.get(k) != n.get(k)]
        elif old.get(key) != new.get(key):
            changed.append(key)
    return "changed: " + ", ".join(changed)


def _plan_automation(client: SyncPrefectClient, crash: CrashDetection) -> Step:
    wanted = crash_automation(crash)
    existing = [a for a in client.read_automations_by_name(CRASH_AUTOMATION) if a.name == CRASH_AUTOMATION]
    if len(existing) > 1:
        ids = ", ".join(str(a.id) for a in existing)
        raise ProvisioningError(
            f"automation {CRASH_AUTOMATION} exists {len(existing)} times ({ids}); delete all but one "
            f"(prefect automation delete --id <id>) and run again"
        )
    detail = (
        f"Crashed after {crash.missing_after_seconds} s without a heartbeat, "
        f"heartbeats every {crash.heartbeat_seconds} s"
    )
    if not existing:

        def create(c: SyncPrefectClient) -> None:
            c.create_automation(wanted)

        return Step("automation", CRASH_AUTOMATION, "create", detail, create)
    (current,) = existing
    old, new = _automation_data(current), _automation_data(wanted)
    if old == new:
        return Step("automation", CRASH_AUTOMATION, "leave")

    def update(c: SyncPrefectClient) -> None:
        c.update_automation(current.id, wanted)

    return Step("automation", CRASH_AUTOMATION, "update", _automation_differences(old, new), update)


# --- stale tag slots ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotReport:
    """What ``--release-stale-slots`` did and saw, per tag limit."""

    lease_storage: str
    released_leases: list[str]
    freed: dict[str, int] = field(default_factory=dict)
    busy: list[str] = field(default_factory=list)
    held: dict[str, int] = field(default_factory=dict)

    def render(self) -> str:
        """Lines for the operator: what was released and what is still held."""
        from skyvault.config.local_server import FILESYSTEM_LEASE_STORAGE

        if self.lease_storage == FILESYSTEM_LEASE_STORAGE:
            lines = [f"released the tag slots of {len(self.released_leases)} expired lease(s)"]
        else:
            lines = [
                f"expired leases: left to the server's repossessor service (lease storage here is "
                f"{self.lease_storage}, not the server's lease files)"
            ]
        lines += [
            f"{name}: freed {n} slot(s) held with no live lease" for name, n in sorted(self.freed.items())
        ]
        lines += [
            f"{name}: its slots changed while they were read; left alone, run again" for name in self.busy
        ]
        lines += [f"{name}: {n} slot(s) held by running task runs" for name, n in sorted(self.held.items())]
        if not (self.freed or self.busy or self.held):
            lines.append("no tag slots held")
        return "\n".join(lines)


def release_stale_slots(tags: Iterable[str]) -> SlotReport:
    """Give back the tag slots whose holder is gone; report what is still held.

    Two kinds of stale slots:

    - Slots under an expired lease (a run that died): released with
      :func:`skyvault.config.local_server.reclaim_expired_leases` when this process uses Prefect's
      filesystem lease storage (``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE``) with the server's
      ``PREFECT_HOME``, so it sees the server's lease files. Otherwise they are left to the server's
      repossessor service, which releases them shortly after they expire.
    - Slots counted with no live lease at all (a server with in-memory leases restarted while runs
      held them). The API does not list leases, but ``GET /concurrency_limits/tag/{tag}`` lists the
      task runs holding a live lease on ``tag:<tag>`` (from the server's own lease storage). When a
      limit counts more slots than that, and its count did not change while both were read, the
      count is set down to the live holders. A run that takes a slot in the instant between that
      read and the write can be admitted once over the limit; a limit whose count moved is left
      alone and named.
    """
    from prefect.settings import PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE

    from skyvault.config.local_server import FILESYSTEM_LEASE_STORAGE, reclaim_expired_leases

    storage = str(PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE.value())
    released: list[str] = []
    if storage == FILESYSTEM_LEASE_STORAGE:
        released = [str(lease) for lease in reclaim_expired_leases()]
    report = SlotReport(lease_storage=storage, released_leases=released)
    with get_client(sync_client=True) as client:
        for tag in sorted(tags):
            name = limit_name(tag)
            try:
                before = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                continue
            if not before.active_slots:
                continue
            live = len(client.read_concurrency_limit_by_tag(tag).active_slots)
            after = client.read_global_concurrency_limit_by_name(name)
            if after.active_slots != before.active_slots:
                report.busy.append(name)
                continue
            if after.active_slots > live:
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=live))
                report.freed[name] = after.active_slots - live
            if live:
                report.held[name] = live
    return report
