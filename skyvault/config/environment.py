"""One deployment environment: ``config/<env>.yaml`` plus environment overrides, validated.

The file says what the config job (``skyvault-provision``) sets up on a Prefect server:

``settings``
    skyvault settings (the keys of :class:`~skyvault.config.settings.Settings`), published as the
    Prefect variables ``skyvault_<key>`` that flow runs read with ``SKYVAULT_PREFECT_VARIABLES=true``.
    Only what the file sets is published; secrets are refused here. Tag concurrency limits are
    ``settings.concurrency.tag_limits`` merged over the defaults.
``secrets``
    per secret setting (``store.secret_access_key``, ``data_catalog.password``, ...) the file that
    holds its one value: the file named by the environment variable ``file_env`` (by default
    ``SKYVAULT_<PATH>_FILE``, e.g. ``SKYVAULT_STORE__SECRET_ACCESS_KEY_FILE``), else ``file``.
    Each becomes the Secret block :func:`~skyvault.config.settings.secret_block_name`.
``aws``
    prefect-aws ``AwsCredentials`` (``credentials``) and ``S3Bucket`` (``buckets``) blocks by name;
    their keys refer to entries of ``secrets`` (``{secret: store.access_key_id}``), and what they
    leave out (region, endpoint, bucket) is taken from ``settings.store``.
``work_pools``
    work pools by name: ``type`` (``docker``), the ``base_job_template`` file and ``job_variables``
    written into it as defaults (mappings such as ``env`` are merged over the template's defaults).
``crash_detection``
    ``heartbeat_seconds`` (how often flow runs send ``prefect.flow-run.heartbeat``, at least 30)
    and ``missing_after_seconds`` (how long a running flow run may stay silent before the
    automation :data:`CRASH_AUTOMATION` marks it Crashed, at least ``heartbeat_seconds`` + 10).
    ``heartbeat_seconds`` is written into every work pool's ``env`` as
    :data:`HEARTBEAT_ENV`, so the flow containers send heartbeats at the rate the automation
    expects; a pool that sets another value there is refused.

Relative paths in the file are resolved against the file's folder; paths in environment
variables against the current folder.

Overrides: an environment variable ``SKYVAULT_PROVISION__<KEY>__<KEY>...`` replaces the value at
that path of the file before it is validated, e.g. ``SKYVAULT_PROVISION__SETTINGS__STORE__BUCKET``
or ``SKYVAULT_PROVISION__WORK_POOLS__SKYVAULT_INGEST__JOB_VARIABLES__IMAGE``. Keys match the
file's keys case-insensitively with ``-`` and ``_`` alike; a key the file lacks is added in lower
case. The value is read as JSON when it is valid JSON (numbers, ``true``, lists, objects,
``"quoted text"``) and as plain text otherwise.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from skyvault.config.settings import (
    NOT_FROM_VARIABLES,
    PREFECT_VARIABLE_PREFIX,
    Settings,
    read_secret_file,
    secret_block_name,
    secret_file_env,
    secret_setting_paths,
    tag_limits,
)
from skyvault.errors import ConfigError

#: Environment variables with this prefix override keys of the environment file.
OVERRIDE_PREFIX = "SKYVAULT_PROVISION__"

#: Longest JSON text a Prefect variable may hold.
MAX_VARIABLE_CHARS = 5000

#: The automation that marks flow runs Crashed when their heartbeats stop.
CRASH_AUTOMATION = "skyvault-crashed-flow-runs"

#: The flow containers' setting of how often a flow run sends a heartbeat, in seconds.
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"

#: Older names Prefect still reads for the same setting.
_HEARTBEAT_ALIASES = ("PREFECT_RUNNER_HEARTBEAT_FREQUENCY",)

#: Prefect's lower bound of the heartbeat frequency.
MIN_HEARTBEAT_SECONDS = 30

#: Silence tolerated beyond one heartbeat period before a run counts as crashed.
MIN_SLACK_SECONDS = 10

_ENV_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_BLOCK_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --- the file as written --------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SecretRef(_Strict):
    """A reference to an entry of ``secrets``: ``{secret: store.access_key_id}``."""

    secret: str


class SecretSource(_Strict):
    """Where a secret's value is read from: the file named by ``file_env``, else ``file``."""

    file_env: str | None = None
    file: Path | None = None


class AwsCredentialsSpec(_Strict):
    """An ``AwsCredentials`` block as written in the file."""

    aws_access_key_id: SecretRef | None = None
    aws_secret_access_key: SecretRef | None = None
    region_name: str | None = None
    endpoint_url: str | None = None


class S3BucketSpec(_Strict):
    """An ``S3Bucket`` block as written in the file; ``credentials`` names an ``AwsCredentials`` block."""

    credentials: str
    bucket_name: str | None = None
    bucket_folder: str = ""


class AwsSpec(_Strict):
    """The prefect-aws blocks of an environment."""

    credentials: dict[str, AwsCredentialsSpec] = Field(default_factory=dict)
    buckets: dict[str, S3BucketSpec] = Field(default_factory=dict)


class WorkPoolSpec(_Strict):
    """A work pool as written in the file."""

    type: str = "docker"
    base_job_template: Path
    job_variables: dict[str, Any] = Field(default_factory=dict)
    description: str | None = None
    concurrency_limit: int | None = Field(None, ge=0)


class CrashDetection(_Strict):
    """How flow runs whose process died are found: heartbeats, and how long one may be missing."""

    heartbeat_seconds: int = Field(ge=MIN_HEARTBEAT_SECONDS)
    missing_after_seconds: int

    @model_validator(mode="after")
    def _window_holds_a_heartbeat(self) -> CrashDetection:
        least = self.heartbeat_seconds + MIN_SLACK_SECONDS
        if self.missing_after_seconds < least:
            raise ValueError(
                f"missing_after_seconds ({self.missing_after_seconds}) must be at least heartbeat_seconds "
                f"+ {MIN_SLACK_SECONDS} ({least}), or running flow runs would be marked Crashed between "
                "two heartbeats"
            )
        return self


class EnvironmentFile(_Strict):
    """The shape of ``config/<env>.yaml``."""

    settings: dict[str, Any] = Field(default_factory=dict)
    secrets: dict[str, SecretSource | None] = Field(default_factory=dict)
    aws: AwsSpec = Field(default_factory=AwsSpec)
    work_pools: dict[str, WorkPoolSpec] = Field(default_factory=dict)
    crash_detection: CrashDetection | None = None


# --- the environment, resolved --------------------------------------------------------------------


class SecretValue(_Strict):
    """A secret read from its file, for the Secret block ``block``."""

    setting: str
    block: str
    file: Path
    value: SecretStr


class AwsCredentialsBlock(_Strict):
    """An ``AwsCredentials`` block to provision, its keys resolved from the secrets."""

    name: str
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    region_name: str | None = None
    endpoint_url: str | None = None


class S3BucketBlock(_Strict):
    """An ``S3Bucket`` block to provision, linked to the ``AwsCredentials`` block ``credentials``."""

    name: str
    bucket_name: str
    credentials: str
    bucket_folder: str = ""


class WorkPoolConfig(_Strict):
    """A work pool to provision: its base job template with the configured defaults written in."""

    name: str
    type: str
    template_file: Path
    base_job_template: dict[str, Any]
    description: str | None = None
    concurrency_limit: int | None = None


class Environment(_Strict):
    """Everything the config job provisions for one environment."""

    name: str
    file: Path
    settings: Settings
    variables: dict[str, Any]
    secrets: list[SecretValue]
    aws_credentials: list[AwsCredentialsBlock]
    s3_buckets: list[S3BucketBlock]
    tag_limits: dict[str, int]
    work_pools: list[WorkPoolConfig]
    crash_detection: CrashDetection | None = None
    overrides: list[str] = Field(default_factory=list)


# --- loading --------------------------------------------------------------------------------------


def environment_file(config_dir: Path, env: str) -> Path:
    """The file of environment ``env``: ``<config_dir>/<env>.yaml``.

    Raises:
        ConfigError: ``env`` is not a plain name (lower-case letters, digits, ``-``, ``_``).

    """
    if not _ENV_NAME.match(env):
        raise ConfigError(f"environment name {env!r} must be lower-case letters, digits, '-' or '_'")
    return config_dir / f"{env}.yaml"


def load_environment(env: str, config_dir: Path, environ: Mapping[str, str]) -> Environment:
    """Read, override and validate ``<config_dir>/<env>.yaml``, reading every secret file.

    Nothing here talks to Prefect: a configuration that cannot be provisioned completely fails
    before anything is changed.

    Raises:
        ConfigError: the file is missing or invalid, or a secret file is missing or empty; the
            message names the file, key, secret, block or pool.

    """
    path = environment_file(config_dir, env)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"environment {env!r}: no file {path}") from e
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"environment {env!r}: cannot read {path}: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    overrides = apply_overrides(data, environ, path)
    try:
        spec = EnvironmentFile.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path}: {_errors(e)}") from e

    base = path.parent
    settings, variables = _settings(spec.settings, path)
    secrets = _secrets(spec.secrets, base, environ, path)
    by_setting = {s.setting: s for s in secrets}
    credentials = _aws_credentials(spec.aws, settings, by_setting, path)
    buckets = _s3_buckets(spec.aws, settings, {c.name for c in credentials}, path)
    crash = spec.crash_detection
    pools = [_work_pool(name, pool, base, path, crash) for name, pool in spec.work_pools.items()]
    _no_secret_leaks(secrets, variables, pools, path)
    return Environment(
        name=env,
        file=path,
        settings=settings,
        variables=variables,
        secrets=secrets,
        aws_credentials=credentials,
        s3_buckets=buckets,
        tag_limits=tag_limits(settings),
        work_pools=pools,
        crash_detection=crash,
        overrides=overrides,
    )


def apply_overrides(data: dict[str, Any], environ: Mapping[str, str], path: Path) -> list[str]:
    """Apply the ``SKYVAULT_PROVISION__...`` variables of ``environ`` to ``data``; their names, sorted.

    Raises:
        ConfigError: a variable's path is empty or runs through a value that is not a mapping.

    """
    applied: list[str] = []
    for name in sorted(environ):
        if not name.upper().startswith(OVERRIDE_PREFIX):
            continue
        parts = name[len(OVERRIDE_PREFIX) :].split("__")
        if not all(parts):
            raise ConfigError(f"{name}: an empty key in the path (keys are separated by '__')")
        node = data
        for depth, part in enumerate(parts):
            key = _match_key(node, part)
            if depth == len(parts) - 1:
                node[key] = _parse_override(environ[name])
                break
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                where = ".".join(p.lower() for p in parts[: depth + 1])
                raise ConfigError(f"{name}: {where} in {path} is not a mapping")
            node = child
        applied.append(name)
    return applied


def _match_key(node: dict[str, Any], part: str) -> str:
    wanted = part.lower().replace("-", "_")
    for key in node:
        if isinstance(key, str) and key.lower().replace("-", "_") == wanted:
            return key
    return part.lower()


def _parse_override(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _errors(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in error.errors()
    )


def _has_path(data: Any, path: tuple[str, ...]) -> bool:
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def _settings(section: dict[str, Any], path: Path) -> tuple[Settings, dict[str, Any]]:
    for key in sorted(NOT_FROM_VARIABLES & section.keys()):
        raise ConfigError(f"{path}: settings.{key} steers how settings are read and cannot be published")
    for secret in secret_setting_paths():
        if _has_path(section, secret):
            dotted = ".".join(secret)
            raise ConfigError(
                f"{path}: settings.{dotted} is a secret and would be published in plain text: "
                f"list it under secrets.{dotted} with the file that holds it"
            )
    try:
        settings = Settings.model_validate(section)  # the file only: no environment, no variables
    except ValidationError as e:
        raise ConfigError(f"{path}: settings: {_errors(e)}") from e
    published = settings.model_dump(mode="json", exclude_unset=True)
    variables: dict[str, Any] = {}
    for key in section:
        name = PREFECT_VARIABLE_PREFIX + key
        value = published[key]
        if len(json.dumps(value)) > MAX_VARIABLE_CHARS:
            raise ConfigError(
                f"{path}: settings.{key} is too large for the Prefect variable {name} "
                f"(at most {MAX_VARIABLE_CHARS} characters of JSON)"
            )
        variables[name] = value
    return settings, variables


def _secrets(
    section: dict[str, SecretSource | None], base: Path, environ: Mapping[str, str], path: Path
) -> list[SecretValue]:
    known = {".".join(p): p for p in secret_setting_paths()}
    out: list[SecretValue] = []
    for dotted, source in section.items():
        if dotted not in known:
            raise ConfigError(
                f"{path}: secrets.{dotted} is not a secret setting (known: {', '.join(sorted(known))})"
            )
        setting = known[dotted]
        source = source or SecretSource()
        block = secret_block_name(setting)
        file_env = source.file_env or secret_file_env(setting)
        if environ.get(file_env):
            file = Path(environ[file_env])
        elif source.file is not None:
            file = source.file if source.file.is_absolute() else base / source.file
        else:
            raise ConfigError(
                f"secret {dotted} (Secret block {block}): no file: set {file_env} "
                f"or secrets.{dotted}.file in {path}"
            )
        value = read_secret_file(file, f"{dotted} (Secret block {block})")
        out.append(SecretValue(setting=dotted, block=block, file=file, value=SecretStr(value)))
    return out


def _secret_of(
    ref: SecretRef | None, where: str, secrets: dict[str, SecretValue], path: Path
) -> SecretStr | None:
    if ref is None:
        return None
    if ref.secret not in secrets:
        raise ConfigError(f"{path}: {where} refers to secret {ref.secret!r}, which is not under secrets")
    return secrets[ref.secret].value


def _aws_credentials(
    aws: AwsSpec, settings: Settings, secrets: dict[str, SecretValue], path: Path
) -> list[AwsCredentialsBlock]:
    out: list[AwsCredentialsBlock] = []
    for name, spec in aws.credentials.items():
        _check_block_name(name, "aws.credentials", path)
        where = f"aws.credentials.{name}"
        out.append(
            AwsCredentialsBlock(
                name=name,
                aws_access_key_id=_secret_of(
                    spec.aws_access_key_id, f"{where}.aws_access_key_id", secrets, path
                ),
                aws_secret_access_key=_secret_of(
                    spec.aws_secret_access_key, f"{where}.aws_secret_access_key", secrets, path
                ),
                region_name=spec.region_name or settings.store.region,
                endpoint_url=spec.endpoint_url or settings.store.endpoint_url,
            )
        )
    return out


def _s3_buckets(aws: AwsSpec, settings: Settings, credentials: set[str], path: Path) -> list[S3BucketBlock]:
    out: list[S3BucketBlock] = []
    for name, spec in aws.buckets.items():
        _check_block_name(name, "aws.buckets", path)
        if spec.credentials not in credentials:
            raise ConfigError(
                f"{path}: aws.buckets.{name}.credentials names {spec.credentials!r}, "
                "which is not under aws.credentials"
            )
        bucket = spec.bucket_name or settings.store.bucket
        if not bucket:
            raise ConfigError(f"{path}: aws.buckets.{name} needs bucket_name (or settings.store.bucket)")
        out.append(
            S3BucketBlock(
                name=name, bucket_name=bucket, credentials=spec.credentials, bucket_folder=spec.bucket_folder
            )
        )
    return out


def _check_block_name(name: str, section: str, path: Path) -> None:
    if not _BLOCK_NAME.match(name):
        raise ConfigError(f"{path}: {section}.{name}: a block name is lower-case letters, digits and '-'")


def _work_pool(
    name: str, spec: WorkPoolSpec, base: Path, path: Path, crash: CrashDetection | None
) -> WorkPoolConfig:
    from prefect.utilities.schema_tools import ValidationError as SchemaValidationError
    from prefect.utilities.schema_tools import validate

    if not _POOL_NAME.match(name):
        raise ConfigError(f"{path}: work pool name {name!r} has characters Prefect refuses")
    file = spec.base_job_template if spec.base_job_template.is_absolute() else base / spec.base_job_template
    try:
        template = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"work pool {name}: cannot read base job template {file}: {e}") from e
    variables = template.get("variables") if isinstance(template, dict) else None
    if (
        not isinstance(variables, dict)
        or not isinstance(properties := variables.get("properties"), dict)
        or not isinstance(template.get("job_configuration"), dict)
    ):
        raise ConfigError(
            f"work pool {name}: base job template {file} needs 'job_configuration' and 'variables.properties'"
        )
    unknown = sorted(set(spec.job_variables) - set(properties))
    if unknown:
        raise ConfigError(
            f"work pool {name}: job variables {unknown} are not in the base job template {file} "
            f"(it has: {', '.join(sorted(properties))})"
        )
    try:
        validate(spec.job_variables, variables, raise_on_error=True, ignore_required=True)
    except SchemaValidationError as e:
        raise ConfigError(f"work pool {name}: job variables do not fit {file}: {e}") from e
    merged = copy.deepcopy(template)
    for key, value in spec.job_variables.items():
        prop = merged["variables"]["properties"][key]
        default = prop.get("default")
        if isinstance(value, dict) and isinstance(default, dict):
            value = {**default, **value}
        prop["default"] = value
    if crash is not None:
        _set_heartbeat(name, merged, crash, path)
    return WorkPoolConfig(
        name=name,
        type=spec.type,
        template_file=file,
        base_job_template=merged,
        description=spec.description,
        concurrency_limit=spec.concurrency_limit,
    )


def _set_heartbeat(name: str, template: dict[str, Any], crash: CrashDetection, path: Path) -> None:
    """Write ``crash.heartbeat_seconds`` into the pool's ``env`` default; refuse another value there."""
    prop = template["variables"]["properties"].get("env")
    if not isinstance(prop, dict):
        raise ConfigError(
            f"work pool {name}: its base job template has no 'env' variable to set {HEARTBEAT_ENV} in"
        )
    env = dict(prop.get("default") or {})
    wanted = str(crash.heartbeat_seconds)
    for key in (HEARTBEAT_ENV, *_HEARTBEAT_ALIASES):
        if key in env and env[key] != wanted:
            raise ConfigError(
                f"work pool {name}: env {key}={env[key]!r} disagrees with "
                f"crash_detection.heartbeat_seconds ({wanted}) in {path}; leave it out, "
                "the config job sets it from crash_detection"
            )
    env[HEARTBEAT_ENV] = wanted
    prop["default"] = env


def _no_secret_leaks(
    secrets: list[SecretValue], variables: dict[str, Any], pools: list[WorkPoolConfig], path: Path
) -> None:
    plain_names = {secret_file_env(p).removesuffix("_FILE") for p in secret_setting_paths()}
    for pool in pools:
        env = pool.base_job_template["variables"]["properties"].get("env", {}).get("default") or {}
        for key in sorted(set(env) & plain_names):
            raise ConfigError(
                f"work pool {pool.name}: env {key} would put a secret in plain text on the server; "
                f"flow runs read it from its Secret block (or mount a file and set {key}_FILE)"
            )
    published: dict[str, set[str]] = {name: _strings(v) for name, v in variables.items()}
    for pool in pools:
        defaults = {k: p.get("default") for k, p in pool.base_job_template["variables"]["properties"].items()}
        published[f"work pool {pool.name}"] = _strings(defaults)
    for secret in secrets:
        value = secret.value.get_secret_value()
        for where, strings in published.items():
            if value in strings:
                raise ConfigError(
                    f"{path}: {where} holds the value of secret {secret.setting}; "
                    "secrets are provisioned only as Secret blocks"
                )


def _strings(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(_strings(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_strings(v) for v in value))
    return set()
