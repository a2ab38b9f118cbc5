"""skyvault's one settings model.

Values come, highest first, from: keyword arguments, ``SKYVAULT_*`` environment variables
(nested with ``__``, e.g. ``SKYVAULT_STORE__BUCKET``), secret files named by ``*_FILE`` environment
variables, and, when ``SKYVAULT_PREFECT_VARIABLES=true``, Prefect Secret blocks and Prefect
variables (both provisioned by the config job), then the YAML file named by
``SKYVAULT_CONFIG_FILE``, then defaults: a local folder as object store and LTS, a static catalog.

Secrets (every ``SecretStr`` field, see :func:`secret_setting_paths`) never come from Prefect
variables, which are plain text: a secret ``store.secret_access_key`` comes from the Secret block
``skyvault-store-secret-access-key`` (:func:`secret_block_name`) or from the file named by
``SKYVAULT_STORE__SECRET_ACCESS_KEY_FILE`` (:func:`secret_file_env`), one value per file with its
trailing newline stripped. A secret found in a Prefect variable is ignored with a warning.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from skyvault.config.collections import CollectionConfig
from skyvault.errors import ConfigError, UnknownCollectionError, UnknownSeriesSourceError

logger = logging.getLogger(__name__)

PREFECT_VARIABLE_PREFIX = "skyvault_"

#: Settings that steer how the settings themselves are read: never taken from Prefect variables.
NOT_FROM_VARIABLES = frozenset({"prefect_variables", "config_file"})


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


class StoreSettings(BaseModel):
    """The object store: a local folder (default) or an S3 bucket."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "s3"] = "local"
    root: Path = Path("skyvault-data/store")
    bucket: str | None = None
    endpoint_url: str | None = None
    region: str = "us-east-1"
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    #: Attempts per S3 request by the client (botocore "standard" retry mode): a request that fails
    #: before its response arrives (connection refused or closed, timeout) or with 5xx/throttling.
    #: What is left after these, and a body cut while it is read, fails the task with a transient
    #: error that the task retry policy retries.
    max_attempts: int = Field(3, ge=1)
    connect_timeout_seconds: float = Field(10.0, gt=0)
    #: Longest silence while waiting for a response or for the next bytes of a body.
    read_timeout_seconds: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _s3_needs_bucket(self) -> StoreSettings:
        if self.kind == "s3" and not self.bucket:
            raise ValueError("store.kind 's3' needs store.bucket")
        return self

    @model_validator(mode="after")
    def _keys_come_in_pairs(self) -> StoreSettings:
        pair = {"access_key_id": self.access_key_id, "secret_access_key": self.secret_access_key}
        missing = [name for name, value in pair.items() if value is None]
        if len(missing) == 1:
            path = ("store", missing[0])
            raise ValueError(
                f"store.{missing[0]} is missing while its pair is set: give it in the Secret block "
                f"{secret_block_name(path)!r} or in the file named by {secret_file_env(path)}"
            )
        return self


class CatalogSettings(BaseModel):
    """Where STAC items go, chosen by ``backend``.

    - ``static`` (default): a static catalog under ``prefix`` on the object store.
    - ``stac-api``: a STAC API with the Transactions extension at ``url`` (e.g.
      stac-fastapi-pgstac), with a bearer ``token`` or ``username`` + ``password`` when it asks.
    - ``pgstac``: a pgstac database at ``dsn`` (``postgresql://user@host:port/db``), its
      ``password`` given apart as a secret.
    """

    model_config = ConfigDict(extra="forbid")

    backend: Literal["static", "stac-api", "pgstac"] = "static"
    prefix: str = "catalog"
    id: str = "skyvault"
    title: str = "skyvault catalog"
    description: str = "Products processed by skyvault"
    url: str | None = None
    dsn: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    #: Items per catalog call when registering in bulk (one transaction or one request each).
    #: pgstac's per-call cost is per partition touched, so larger batches load faster.
    batch_size: int = Field(2000, ge=1)
    #: Items built at once from COGs by one bulk registration (threads).
    build_workers: int = Field(default_factory=cpu_count, ge=1)
    timeout_seconds: float = Field(60.0, gt=0)
    #: Attempts per catalog call when the service is unreachable, overloaded (429) or failing (5xx).
    max_attempts: int = Field(5, ge=1)
    backoff_seconds: float = Field(0.5, ge=0)
    #: Catalog database dumps (pgstac): where on the object store, and how long they are kept.
    backup_prefix: str = "backups/catalog"
    backup_keep_days: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _backend_needs_its_address(self) -> CatalogSettings:
        if self.backend == "stac-api" and not self.url:
            raise ValueError("catalog.backend 'stac-api' needs catalog.url (SKYVAULT_CATALOG__URL)")
        if self.backend == "pgstac" and not self.dsn:
            raise ValueError("catalog.backend 'pgstac' needs catalog.dsn (SKYVAULT_CATALOG__DSN)")
        return self


class LtsSettings(BaseModel):
    """Long-term storage: a mounted folder, datablock size and space checks."""

    model_config = ConfigDict(extra="forbid")

    root: Path = Path("skyvault-data/lts")
    #: Create ``root`` when it is missing. Off by default: a missing LTS mount point must fail the
    #: archive instead of silently filling the filesystem under it.
    create_root: bool = False
    datablock_bytes: int = Field(100 * 1024**3, gt=0)
    free_space_margin_bytes: int = Field(64 * 1024**2, ge=0)
    free_space_wait_seconds: float = Field(0.0, ge=0)
    keep_landing: bool = False
    retrieval_prefix: str = "retrieval"
    url_expiry_days: float = Field(7, gt=0, le=7)


class DataCatalogSettings(BaseModel):
    """A SciCat-style data catalog that receives job and dataset status (optional)."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    timeout_seconds: float = 30.0
    retries: int = Field(4, ge=0)
    backoff_seconds: float = Field(0.5, ge=0)


class GatewaySettings(BaseModel):
    """The HTTP gateway (``skyvault-api``) other systems call to start runs.

    Callers authenticate with HTTP Basic (``username`` + ``password``) or a bearer ``token``;
    both secrets come from files (``SKYVAULT_GATEWAY__PASSWORD_FILE``,
    ``SKYVAULT_GATEWAY__TOKEN_FILE``) or Secret blocks, never from Prefect variables.
    """

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8600, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    #: Largest request body read; a larger one is refused (413) before or while it is read.
    max_body_bytes: int = Field(16 * 1024**2, ge=1)
    #: Whether the map page (``/map``: tiles, footprints, item links) is readable without
    #: credentials; false puts it behind the same HTTP Basic / bearer check as the API.
    public_map: bool = True


#: The periods one series block may cover, aligned on UTC boundaries.
SERIES_PERIODS = ("hourly", "daily", "monthly", "yearly")
_RESOLUTION_UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86400}


class SampleLimits(BaseModel):
    """What a valid sensor sample of one source holds; a sample outside them is rejected."""

    model_config = ConfigDict(extra="forbid")

    co2_ppm_min: float = 0.0
    co2_ppm_max: float = 10000.0
    temperature_celsius_min: float = -20.0
    temperature_celsius_max: float = 40.0
    #: Decimals a temperature may carry (0.1 °C steps by default).
    temperature_decimals: int = Field(1, ge=0, le=6)
    rel_humidity_percent_min: float = 0.0
    rel_humidity_percent_max: float = 100.0
    statuses: tuple[str, ...] = ("M", "R", "E")


class CacheLevel(BaseModel):
    """One cache level of a source, ``resolution | period`` (e.g. ``60 s | daily``).

    Bins of ``resolution_seconds`` (a divisor of an hour for hourly periods, of a day otherwise)
    start at UTC period boundaries; one block holds one period.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    resolution_seconds: int = Field(gt=0)
    period: Literal["hourly", "daily", "monthly", "yearly"]

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        resolution, sep, period = value.partition("|")
        amount, _, unit = resolution.strip().partition(" ")
        unit = unit.strip()
        if not sep or unit not in _RESOLUTION_UNITS or not amount.isdigit():
            raise ValueError(
                f"cache level {value!r} is not '<n> <unit> | <period>' with unit one of "
                f"{', '.join(_RESOLUTION_UNITS)} and period one of {', '.join(SERIES_PERIODS)}"
            )
        return {"resolution_seconds": int(amount) * _RESOLUTION_UNITS[unit], "period": period.strip()}

    @model_validator(mode="after")
    def _bins_fit_periods(self) -> CacheLevel:
        span = 3600 if self.period == "hourly" else 86400
        if span % self.resolution_seconds:
            raise ValueError(
                f"cache level resolution {self.resolution_seconds} s does not divide "
                f"{'an hour' if span == 3600 else 'a day'}, so its bins would not start at {self.period} "
                "period boundaries"
            )
        return self

    @property
    def name(self) -> str:
        """The level's folder under ``series/<source>/``: the resolution in seconds, ``60s``."""
        return f"{self.resolution_seconds}s"

    def __str__(self) -> str:
        return f"{self.resolution_seconds} s | {self.period}"


class SeriesSource(BaseModel):
    """One source of sensor samples: files under ``landing/samples/<id>/``, its limits and cache levels."""

    model_config = ConfigDict(extra="forbid")

    id: str
    limits: SampleLimits = Field(default_factory=SampleLimits)
    cache_levels: tuple[CacheLevel, ...] = Field(
        default_factory=lambda: (
            CacheLevel(resolution_seconds=60, period="daily"),
            CacheLevel(resolution_seconds=3600, period="monthly"),
        )
    )
    #: Statuses whose samples enter reduced series (all are stored); ``E`` (error) is left out.
    reduce_statuses: tuple[str, ...] = ("M", "R")
    #: A command that streams full-resolution samples instead of the sample database: its
    #: arguments, ``{start}`` and ``{end}`` replaced by the range (ISO 8601 UTC, end exclusive); it
    #: writes CSV with the samples' columns to stdout. Run without a shell.
    reader: tuple[str, ...] | None = None
    #: How long one reader run may take before it is killed and fails.
    reader_timeout_seconds: float = Field(300.0, gt=0)
    #: Most bytes of CSV one reader run may write; more kills it and fails.
    reader_max_bytes: int = Field(256 * 1024**2, ge=1)

    @model_validator(mode="after")
    def _one_level_per_resolution(self) -> SeriesSource:
        names = [level.name for level in self.cache_levels]
        if len(set(names)) != len(names):
            raise ValueError(f"series source {self.id!r}: two cache levels share a resolution ({names})")
        if self.reader is not None and not self.reader:
            raise ValueError(f"series source {self.id!r}: reader is an empty command")
        return self


class SeriesSettings(BaseModel):
    """Sensor time series: the sample database, the sources and where blocks go.

    ``database`` is ``sqlite`` (default: one local file at ``sqlite_path``, no server) or
    ``postgresql`` at ``dsn`` (``postgresql://user@host:port/db``), its ``password`` given apart as
    a secret (``SKYVAULT_SERIES__PASSWORD_FILE`` or the Secret block ``skyvault-series-password``).
    """

    model_config = ConfigDict(extra="forbid")

    database: Literal["sqlite", "postgresql"] = "sqlite"
    sqlite_path: Path = Path("skyvault-data/series.sqlite3")
    dsn: str | None = None
    password: SecretStr | None = None
    #: How long a writer waits for another's transaction (SQLite busy timeout, PostgreSQL connect).
    busy_timeout_seconds: float = Field(60.0, gt=0)
    landing_prefix: str = "landing/samples"
    prefix: str = "series"
    #: Largest fixture JSON file (``.json``), the one format read whole; a larger one fails alone,
    #: naming this setting. JSON lines and CSV files are streamed and have no size limit.
    max_file_bytes: int = Field(512 * 1024**2, ge=1)
    #: Samples parsed and written per step of a file's one transaction: an ingest holds about this
    #: many samples in memory, whatever the file's size.
    ingest_chunk_samples: int = Field(100_000, ge=1)
    #: Rejected samples listed (line and reason) per file in an ingest's result; all are counted.
    max_listed_rejections: int = Field(10_000, ge=0)
    #: Blocks built by one seeding task (one database read per block, one lock per level).
    blocks_per_task: int = Field(64, ge=1)
    #: Most bins one read (``GET /series/<source>``) may answer, per node.
    max_read_bins: int = Field(100_000, ge=1)
    sources: dict[str, SeriesSource] = Field(default_factory=dict)

    @field_validator("sources", mode="before")
    @classmethod
    def _ids_from_keys(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: ({"id": k, **v} if isinstance(v, dict) else v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _postgresql_needs_dsn(self) -> SeriesSettings:
        if self.database == "postgresql" and not self.dsn:
            raise ValueError("series.database 'postgresql' needs series.dsn (SKYVAULT_SERIES__DSN)")
        for key, source in self.sources.items():
            if key != source.id:
                raise ValueError(f"series source key {key!r} differs from its id {source.id!r}")
        return self

    def source(self, source_id: str) -> SeriesSource:
        """The named source's config.

        Raises:
            UnknownSeriesSourceError: no source with that id is configured.

        """
        try:
            return self.sources[source_id]
        except KeyError:
            known = ", ".join(sorted(self.sources)) or "none"
            raise UnknownSeriesSourceError(
                f"unknown series source {source_id!r} (configured: {known})"
            ) from None


#: The concurrency tags skyvault's tasks carry and their default limits (concurrent task runs per
#: Prefect server). A configured ``concurrency.tag_limits`` overrides these one tag at a time.
DEFAULT_TAG_LIMITS: dict[str, int] = {
    "lts-read": 4,
    "lts-write": 4,
    "object-store-read": 16,
    "object-store-write": 16,
    "catalog-write": 4,
    "catalog-backup": 1,
    "data-catalog": 4,
}


class ConcurrencySettings(BaseModel):
    """Parallelism inside a run and tag concurrency limits provisioned on the Prefect server."""

    model_config = ConfigDict(extra="forbid")

    products: int = Field(4, ge=1)
    #: Most products one ``process-products`` run takes. An ingest with more than twice as many
    #: small products as ``products`` runs them in batches of up to this many, one run per batch
    #: (each step a task for the whole batch), so a backlog of small products does not pay a flow
    #: run each; 1 runs every product in its own ``process-product`` run.
    batch_products: int = Field(16, ge=1)
    #: A product is batched only when its source is at most this many bytes (larger products'
    #: conversion outweighs their run's cost, and each gets its own run).
    batch_source_bytes: int = Field(32 * 1024 * 1024, ge=0)
    #: Limit per tag; configured values are merged over :data:`DEFAULT_TAG_LIMITS`, so setting one
    #: tag never leaves the others unlimited. A limit below 1 would abort every task with the tag.
    tag_limits: dict[str, Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: dict(DEFAULT_TAG_LIMITS)
    )
    #: Chunks of one seed rendered at once (threads of the seeding run): one per CPU by default.
    #: Seeds of different layers run side by side; two seeds of one layer take turns (a lock).
    seed_workers: int = Field(default_factory=cpu_count, ge=1)

    @field_validator("tag_limits", mode="before")
    @classmethod
    def _over_defaults(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {**DEFAULT_TAG_LIMITS, **value}
        return value


class LockSettings(BaseModel):
    """Locks across processes and hosts: how long S3 leases last and how long a run waits."""

    model_config = ConfigDict(extra="forbid")

    #: How long an S3 lease lasts unrenewed (renewed every third of it): a killed holder's lease is
    #: taken over after this. Local locks (``flock``) are freed at once when their holder dies.
    lease_seconds: float = Field(30.0, gt=0)
    #: How long a run waits for a lock another run holds (archive or retrieve of one dataset, and
    #: whatever else takes ``ObjectStore.lock`` with it); None waits until it is free.
    wait_seconds: float | None = Field(None, ge=0)


class LimitSettings(BaseModel):
    """Guards against hostile or mistaken input, and how long scratch leftovers are kept.

    A product over a limit fails alone, before any pixel is read, with a message naming the limit
    and the setting that raises it (``SKYVAULT_LIMITS__<NAME>``).
    """

    model_config = ConfigDict(extra="forbid")

    #: Pixels in one band (width x height) of a source raster, and of its reprojected COG.
    max_pixels: int = Field(2**31, ge=1)
    #: Bands of a source raster.
    max_bands: int = Field(1024, ge=1)
    #: Size of one browse report or JSON sidecar.
    max_sidecar_bytes: int = Field(16 * 1024**2, ge=1)
    #: Nesting depth of a JSON sidecar (objects and arrays) or a browse report (elements).
    max_nesting_depth: int = Field(64, ge=1)
    #: A scratch folder left by a process that cannot be checked (another host or container) is
    #: removed once nothing in it changed for this long; one left by a dead process on this host
    #: is removed at once.
    stale_scratch_seconds: float = Field(24 * 3600.0, gt=0)


class Settings(BaseSettings):
    """Everything skyvault reads from its environment, built once per entry point."""

    model_config = SettingsConfigDict(
        env_prefix="SKYVAULT_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    config_file: Path | None = None
    prefect_variables: bool = False
    scratch_dir: Path = Path("skyvault-data/scratch")
    store: StoreSettings = Field(default_factory=StoreSettings)
    catalog: CatalogSettings = Field(default_factory=CatalogSettings)
    lts: LtsSettings = Field(default_factory=LtsSettings)
    data_catalog: DataCatalogSettings = Field(default_factory=DataCatalogSettings)
    concurrency: ConcurrencySettings = Field(default_factory=ConcurrencySettings)
    locks: LockSettings = Field(default_factory=LockSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    series: SeriesSettings = Field(default_factory=SeriesSettings)
    collections: dict[str, CollectionConfig] = Field(default_factory=dict)

    @field_validator("collections", mode="before")
    @classmethod
    def _ids_from_keys(cls, value: Any) -> Any:
        if isinstance(value, dict):
            out = {}
            for key, body in value.items():
                if isinstance(body, dict):
                    body = {"id": key, **body}
                out[key] = body
            return out
        return value

    @model_validator(mode="after")
    def _keys_match_ids(self) -> Settings:
        for key, coll in self.collections.items():
            if key != coll.id:
                raise ValueError(f"collection key {key!r} differs from its id {coll.id!r}")
        return self

    def collection(self, collection_id: str) -> CollectionConfig:
        """The named collection's config.

        Raises:
            UnknownCollectionError: no collection with that id is configured.

        """
        try:
            return self.collections[collection_id]
        except KeyError:
            known = ", ".join(sorted(self.collections)) or "none"
            raise UnknownCollectionError(
                f"unknown collection {collection_id!r} (configured: {known})"
            ) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            _EnvWithoutSecretFiles(settings_cls, env_settings),
            _SecretFilesSource(settings_cls, env_settings),
            file_secret_settings,
            _PrefectSecretBlocksSource(settings_cls, env_settings),
            _PrefectVariablesSource(settings_cls, env_settings),
            _YamlFileSource(settings_cls, init_settings, env_settings),
        )


# --- secrets --------------------------------------------------------------------------------------


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or SecretStr in get_args(annotation)


def _model_class(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def secret_setting_paths(model: type[BaseModel] | None = None) -> tuple[tuple[str, ...], ...]:
    """The path of every secret (``SecretStr``) field, e.g. ``("store", "secret_access_key")``.

    Secrets inside mappings (such as ``collections``) are not supported: a secret must sit at a fixed path.
    """
    paths: list[tuple[str, ...]] = []
    for name, info in (model or Settings).model_fields.items():
        if _is_secret(info.annotation):
            paths.append((name,))
        elif (sub := _model_class(info.annotation)) is not None:
            paths.extend((name, *path) for path in secret_setting_paths(sub))
    return tuple(paths)


def secret_block_name(path: tuple[str, ...]) -> str:
    """The Prefect Secret block that holds the secret at ``path``: ``skyvault-store-secret-access-key``."""
    return "skyvault-" + "-".join(part.replace("_", "-") for part in path)


def secret_file_env(path: tuple[str, ...]) -> str:
    """The environment variable naming a file with the secret: ``SKYVAULT_STORE__SECRET_ACCESS_KEY_FILE``."""
    return "SKYVAULT_" + "__".join(part.upper() for part in path) + "_FILE"


def read_secret_file(path: Path, secret: str) -> str:
    """The one value in a secret file, its trailing newline stripped.

    Raises:
        ConfigError: the file is missing, unreadable or empty; the message names ``secret`` and the file.

    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"secret {secret}: file {path} does not exist") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"secret {secret}: cannot read file {path}: {e}") from e
    value = text.rstrip("\r\n")
    if not value.strip():
        raise ConfigError(f"secret {secret}: file {path} is empty")
    return value


def _pop_path(data: dict[str, Any], path: tuple[str, ...]) -> bool:
    node: Any = data
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and path[-1] in node:
        del node[path[-1]]
        return True
    return False


def _set_path(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def _env_vars(env_settings: PydanticBaseSettingsSource) -> dict[str, str]:
    raw = getattr(env_settings, "env_vars", None) or {}
    return {str(k).lower(): str(v) for k, v in raw.items() if v is not None}


def _env_value(
    env_settings: PydanticBaseSettingsSource, init: PydanticBaseSettingsSource | None, name: str
) -> Any:
    for source in (init, env_settings):
        if source is None:
            continue
        value = source().get(name)
        if value is not None:
            return value
    return None


def _prefect_enabled(env_settings: PydanticBaseSettingsSource) -> bool:
    flag = _env_value(env_settings, None, "prefect_variables")
    return str(flag).lower() in ("1", "true", "yes", "on") if flag is not None else False


class _WholeSource(PydanticBaseSettingsSource):
    """A settings source that gives its values all at once from ``__call__``."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False


class _EnvSource(_WholeSource):
    """A source derived from the ``SKYVAULT_*`` environment (pydantic's own env source)."""

    def __init__(self, settings_cls: type[BaseSettings], env_settings: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self._env = env_settings


class _EnvWithoutSecretFiles(_EnvSource):
    """The ``SKYVAULT_*`` environment, without the ``*_FILE`` names that :class:`_SecretFilesSource` reads."""

    def __call__(self) -> dict[str, Any]:
        data = self._env()
        for path in secret_setting_paths(self.settings_cls):
            _pop_path(data, (*path[:-1], path[-1] + "_file"))
        return data


class _SecretFilesSource(_EnvSource):
    """Secrets from the files named by ``SKYVAULT_<PATH>_FILE`` environment variables."""

    def __call__(self) -> dict[str, Any]:
        env = _env_vars(self._env)
        out: dict[str, Any] = {}
        for path in secret_setting_paths(self.settings_cls):
            name = secret_file_env(path)
            file = env.get(name.lower())
            if file:
                _set_path(out, path, read_secret_file(Path(file), f"{'.'.join(path)} ({name})"))
        return out


class _YamlFileSource(_WholeSource):
    """Reads the YAML file named by ``config_file`` (keyword or ``SKYVAULT_CONFIG_FILE``)."""

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
    ) -> None:
        super().__init__(settings_cls)
        self._path = _env_value(env_settings, init_settings, "config_file")

    def __call__(self) -> dict[str, Any]:
        if not self._path:
            return {}
        path = Path(self._path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        return data


class _PrefectSecretBlocksSource(_EnvSource):
    """Secrets from the Prefect Secret blocks named by :func:`secret_block_name`.

    Only consulted when ``SKYVAULT_PREFECT_VARIABLES=true``; a block that does not exist gives nothing.
    """

    def __call__(self) -> dict[str, Any]:
        if not _prefect_enabled(self._env):
            return {}
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        out: dict[str, Any] = {}
        with get_client(sync_client=True) as client:
            for path in secret_setting_paths(self.settings_cls):
                name = secret_block_name(path)
                try:
                    document = client.read_block_document_by_name(name, "secret", include_secrets=True)
                except ObjectNotFound:
                    continue
                except Exception as e:  # the API is down, refused the request...
                    raise ConfigError(f"cannot read Prefect Secret block {name!r}: {e}") from e
                value = document.data.get("value")
                if not isinstance(value, str) or not value:
                    raise ConfigError(f"Prefect Secret block {name!r} does not hold a text value")
                _set_path(out, path, value)
        return out


class _PrefectVariablesSource(_EnvSource):
    """Reads Prefect variables named ``skyvault_<field>`` (JSON values for nested fields).

    Only consulted when ``SKYVAULT_PREFECT_VARIABLES=true``, so the embedded default never needs
    a Prefect API to build its settings. Variables are plain text: a secret found in one is
    dropped (with a warning naming the variable and the secret, never its value).
    """

    def __call__(self) -> dict[str, Any]:
        if not _prefect_enabled(self._env):
            return {}
        from prefect.client.orchestration import get_client

        secrets = secret_setting_paths(self.settings_cls)
        out: dict[str, Any] = {}
        with get_client(sync_client=True) as client:
            for name in self.settings_cls.model_fields:
                if name in NOT_FROM_VARIABLES:
                    continue
                variable_name = PREFECT_VARIABLE_PREFIX + name
                try:
                    variable = client.read_variable_by_name(variable_name)
                except Exception as e:  # the API is down, refused the request...
                    raise ConfigError(f"cannot read Prefect variable {variable_name!r}: {e}") from e
                if variable is None or variable.value is None:
                    continue
                value: Any = variable.value
                for path in (p for p in secrets if p[0] == name):
                    whole = len(path) == 1
                    if whole or (isinstance(value, dict) and _pop_path({name: value}, path)):
                        logger.warning(
                            "Prefect variable %s holds the secret %s; it is ignored: secrets come from "
                            "the Secret block %s or the file named by %s",
                            variable_name,
                            ".".join(path),
                            secret_block_name(path),
                            secret_file_env(path),
                        )
                    if whole:
                        value = None
                if value is not None:
                    out[name] = value
        return out


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, built once from the environment (see the module docstring)."""
    try:
        return Settings()
    except ConfigError:
        raise
    except Exception as e:  # pydantic ValidationError and friends
        raise ConfigError(f"invalid skyvault settings: {e}") from e


def collection_write_tag(collection_id: str) -> str:
    """The tag of bulk catalog writes into one collection (``catalog-write-<collection>``)."""
    return f"catalog-write-{collection_id}"


def tag_limits(settings: Settings) -> dict[str, int]:
    """Every tag concurrency limit skyvault needs, by tag.

    :func:`collection_write_tag` is limited to 1 for each configured collection: bulk loads of
    one collection take turns across runs (on pgstac, concurrent loads into one partition
    deadlock). A configured limit for such a tag wins.
    """
    limits = dict(settings.concurrency.tag_limits)
    for collection_id in settings.collections:
        limits.setdefault(collection_write_tag(collection_id), 1)
    return limits
