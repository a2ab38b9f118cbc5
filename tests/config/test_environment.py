"""Environment files: config/<env>.yaml, overrides, secret files, work-pool templates, run-time secrets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from skyvault.config.environment import HEARTBEAT_ENV, Environment, load_environment
from skyvault.config.settings import (
    Settings,
    collection_write_tag,
    get_settings,
    read_secret_file,
    secret_block_name,
    secret_file_env,
    secret_setting_paths,
)
from skyvault.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "config"
TEMPLATE = ROOT / "deployment" / "work-pools" / "docker.json"
POOLS = {"skyvault-ingest", "skyvault-archival", "skyvault-retrieval"}

SECRET_VALUES = {
    "store.access_key_id": "AKIDEV0000",
    "store.secret_access_key": "s3cr3t/with+symbols",
    "data_catalog.password": "catalog pass",
}


def secret_files(folder: Path, values: dict[str, str] | None = None) -> dict[str, str]:
    """Write one file per secret (with a trailing newline); the SKYVAULT_*_FILE variables naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    environ: dict[str, str] = {}
    for setting, value in (values or SECRET_VALUES).items():
        path = tuple(setting.split("."))
        file = folder / secret_block_name(path)
        file.write_text(value + "\n", encoding="utf-8")
        environ[secret_file_env(path)] = str(file)
    return environ


def write_env(folder: Path, body: dict[str, Any], name: str = "test") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(body), encoding="utf-8")
    return folder


def minimal(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "settings": {"store": {"kind": "s3", "bucket": "b1", "endpoint_url": "http://127.0.0.1:9"}},
        "work_pools": {"pool-a": {"base_job_template": str(TEMPLATE), "job_variables": {"image": "img:1"}}},
    }
    body.update(extra)
    return body


# --- the shipped environment files ----------------------------------------------------------------


@pytest.mark.parametrize("env", ["dev", "prod"])
def test_shipped_environments_load(env: str, tmp_path: Path) -> None:
    loaded = load_environment(env, CONFIG_DIR, secret_files(tmp_path))
    assert {p.name for p in loaded.work_pools} == POOLS
    for pool in loaded.work_pools:
        assert pool.type == "docker"
        props = pool.base_job_template["variables"]["properties"]
        assert props["network_mode"]["default"] == "host"
        assert props["auto_remove"]["default"] is True
        assert props["image"]["default"]
        assert props["env"]["default"]["SKYVAULT_PREFECT_VARIABLES"] == "true"
        assert loaded.crash_detection is not None
        assert props["env"]["default"][HEARTBEAT_ENV] == str(loaded.crash_detection.heartbeat_seconds)
        volumes = props["volumes"]["default"]
        assert any(v.endswith(":/scratch") for v in volumes)
        if pool.name != "skyvault-ingest":
            assert f"{loaded.settings.lts.root}:{loaded.settings.lts.root}" in volumes
    assert loaded.variables["skyvault_store"]["kind"] == "s3"
    assert "secret_access_key" not in json.dumps(loaded.variables)
    assert {s.block for s in loaded.secrets} == {
        "skyvault-store-access-key-id",
        "skyvault-store-secret-access-key",
        "skyvault-data-catalog-password",
    }
    # the configured tag limits sit over the defaults: every default tag still has a limit
    assert set(loaded.tag_limits) >= {"lts-read", "lts-write", "object-store-read", "catalog-write"}
    # and every collection's bulk catalog writes take turns
    writes = {collection_write_tag(c): 1 for c in loaded.settings.collections}
    assert loaded.tag_limits == {**loaded.variables["skyvault_concurrency"]["tag_limits"], **writes}


def test_dev_file_merges_its_tag_limits_over_the_defaults(tmp_path: Path) -> None:
    loaded = load_environment("dev", CONFIG_DIR, secret_files(tmp_path))
    assert loaded.tag_limits["lts-write"] == 2
    assert loaded.tag_limits["object-store-write"] == 8
    assert loaded.tag_limits["catalog-write"] == 4
    assert loaded.tag_limits["data-catalog"] == 4


def test_aws_blocks_take_what_they_leave_out_from_the_store_settings(tmp_path: Path) -> None:
    loaded = load_environment("dev", CONFIG_DIR, secret_files(tmp_path))
    (creds,) = loaded.aws_credentials
    assert creds.endpoint_url == loaded.settings.store.endpoint_url
    assert creds.region_name == loaded.settings.store.region
    assert creds.aws_secret_access_key is not None
    assert creds.aws_secret_access_key.get_secret_value() == SECRET_VALUES["store.secret_access_key"]
    (bucket,) = loaded.s3_buckets
    assert bucket.bucket_name == loaded.settings.store.bucket
    assert bucket.credentials == creds.name


def test_docker_template_is_prefect_dockers_own_with_other_defaults() -> None:
    from prefect_docker.worker import DockerWorker

    upstream = DockerWorker.get_default_base_job_template()
    ours = json.loads(TEMPLATE.read_text())
    assert ours["job_configuration"] == upstream["job_configuration"]
    assert ours["variables"]["properties"].keys() == upstream["variables"]["properties"].keys()
    for key, prop in ours["variables"]["properties"].items():
        theirs = upstream["variables"]["properties"][key]
        assert {k: v for k, v in prop.items() if k != "default"} == {
            k: v for k, v in theirs.items() if k != "default"
        }, key
    defaults = {k: p.get("default") for k, p in ours["variables"]["properties"].items()}
    assert defaults["network_mode"] == "host"
    assert defaults["auto_remove"] is True
    assert defaults["image_pull_policy"] == "IfNotPresent"


# --- secret files ---------------------------------------------------------------------------------


def test_a_secret_file_loses_its_trailing_newline_only(tmp_path: Path) -> None:
    file = tmp_path / "s"
    file.write_bytes(b"  spaced value \r\n")
    assert read_secret_file(file, "x") == "  spaced value "
    file.write_bytes(b"no-newline")
    assert read_secret_file(file, "x") == "no-newline"


@pytest.mark.parametrize("content", [None, b"", b"\n", b"  \n"])
def test_a_missing_or_empty_secret_file_fails_naming_secret_and_file(
    tmp_path: Path, content: bytes | None
) -> None:
    environ = secret_files(tmp_path / "secrets")
    broken = Path(environ["SKYVAULT_STORE__SECRET_ACCESS_KEY_FILE"])
    if content is None:
        broken.unlink()
    else:
        broken.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_environment("dev", CONFIG_DIR, environ)
    message = str(caught.value)
    assert "store.secret_access_key" in message
    assert "skyvault-store-secret-access-key" in message
    assert str(broken) in message
    assert ("does not exist" if content is None else "is empty") in message


def test_a_secret_file_from_the_environment_wins_over_the_file_in_the_config(tmp_path: Path) -> None:
    (tmp_path / "in-config").write_text("from-config\n")
    (tmp_path / "from-env").write_text("from-env\n")
    folder = write_env(
        tmp_path / "cfg",
        minimal(secrets={"data_catalog.token": {"file": str(tmp_path / "in-config")}}),
    )
    assert load_environment("test", folder, {}).secrets[0].value.get_secret_value() == "from-config"
    environ = {"SKYVAULT_DATA_CATALOG__TOKEN_FILE": str(tmp_path / "from-env")}
    (secret,) = load_environment("test", folder, environ).secrets
    assert secret.value.get_secret_value() == "from-env"
    assert secret.block == "skyvault-data-catalog-token"


def test_a_secret_without_any_file_names_the_variable_to_set(tmp_path: Path) -> None:
    folder = write_env(tmp_path, minimal(secrets={"data_catalog.token": None}))
    with pytest.raises(ConfigError, match=r"data_catalog\.token.*SKYVAULT_DATA_CATALOG__TOKEN_FILE"):
        load_environment("test", folder, {})


def test_a_secret_written_into_the_settings_is_refused(tmp_path: Path) -> None:
    body = minimal()
    body["settings"]["store"]["secret_access_key"] = "plain"
    folder = write_env(tmp_path, body)
    with pytest.raises(ConfigError, match=r"settings\.store\.secret_access_key is a secret"):
        load_environment("test", folder, {})


def test_a_secret_value_in_a_work_pool_env_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tok").write_text("tok-123\n")
    body = minimal(secrets={"data_catalog.token": {"file": str(tmp_path / "tok")}})
    body["work_pools"]["pool-a"]["job_variables"]["env"] = {"SOME_TOKEN": "tok-123"}
    folder = write_env(tmp_path / "cfg", body)
    with pytest.raises(ConfigError, match=r"work pool pool-a holds the value of secret data_catalog\.token"):
        load_environment("test", folder, {})
    body["work_pools"]["pool-a"]["job_variables"]["env"] = {"SKYVAULT_DATA_CATALOG__TOKEN": "x"}
    folder = write_env(tmp_path / "cfg", body)
    with pytest.raises(ConfigError, match=r"pool-a: env SKYVAULT_DATA_CATALOG__TOKEN would put a secret"):
        load_environment("test", folder, {})


def test_an_unknown_secret_setting_lists_the_known_ones(tmp_path: Path) -> None:
    folder = write_env(tmp_path, minimal(secrets={"store.bucket": {"file": "x"}}))
    with pytest.raises(
        ConfigError, match=r"secrets\.store\.bucket is not a secret setting.*store\.access_key_id"
    ):
        load_environment("test", folder, {})


# --- validation and overrides ---------------------------------------------------------------------


def test_a_missing_environment_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"environment 'staging': no file .*staging\.yaml"):
        load_environment("staging", tmp_path, {})
    with pytest.raises(ConfigError, match="environment name"):
        load_environment("../etc/passwd", tmp_path, {})


def test_invalid_settings_are_named_with_the_file(tmp_path: Path) -> None:
    body = minimal()
    body["settings"]["store"] = {"kind": "s3"}
    folder = write_env(tmp_path, body)
    with pytest.raises(ConfigError, match=r"test\.yaml: settings: store.*bucket"):
        load_environment("test", folder, {})


def test_job_variables_must_be_keys_and_types_of_the_template(tmp_path: Path) -> None:
    body = minimal()
    body["work_pools"]["pool-a"]["job_variables"]["gpu_count"] = 1
    folder = write_env(tmp_path, body)
    with pytest.raises(ConfigError, match=r"work pool pool-a: job variables \['gpu_count'\] are not in"):
        load_environment("test", folder, {})
    body = minimal()
    body["work_pools"]["pool-a"]["job_variables"]["auto_remove"] = "yes please"
    folder = write_env(tmp_path, body)
    with pytest.raises(ConfigError, match=r"work pool pool-a: job variables do not fit .*auto_remove"):
        load_environment("test", folder, {})


def test_env_defaults_are_merged_over_the_templates(tmp_path: Path) -> None:
    body = minimal()
    body["work_pools"]["pool-a"]["job_variables"]["env"] = {"EXTRA": "1"}
    loaded = load_environment("test", write_env(tmp_path, body), {})
    env = loaded.work_pools[0].base_job_template["variables"]["properties"]["env"]["default"]
    assert env == {"SKYVAULT_PREFECT_VARIABLES": "true", "EXTRA": "1"}


def test_environment_variables_override_keys_of_the_file(tmp_path: Path) -> None:
    environ = {
        **secret_files(tmp_path),
        "SKYVAULT_PROVISION__SETTINGS__STORE__BUCKET": "from-env",
        "SKYVAULT_PROVISION__SETTINGS__CONCURRENCY__TAG_LIMITS__LTS_WRITE": "3",
        "SKYVAULT_PROVISION__WORK_POOLS__SKYVAULT_INGEST__JOB_VARIABLES__IMAGE": "reg/skyvault:9",
        "SKYVAULT_PROVISION__WORK_POOLS__SKYVAULT_ARCHIVAL__CONCURRENCY_LIMIT": "2",
        "SKYVAULT_STORE__BUCKET": "not-for-the-config-job",
    }
    loaded = load_environment("dev", CONFIG_DIR, environ)
    assert loaded.settings.store.bucket == "from-env"
    assert loaded.variables["skyvault_store"]["bucket"] == "from-env"
    assert loaded.s3_buckets[0].bucket_name == "from-env"
    assert loaded.tag_limits["lts-write"] == 3
    pools = {p.name: p for p in loaded.work_pools}
    image = pools["skyvault-ingest"].base_job_template["variables"]["properties"]["image"]["default"]
    assert image == "reg/skyvault:9"
    assert pools["skyvault-archival"].concurrency_limit == 2
    assert len(loaded.overrides) == 4


def test_an_override_through_a_non_mapping_is_named(tmp_path: Path) -> None:
    environ = {**secret_files(tmp_path), "SKYVAULT_PROVISION__SETTINGS__STORE__BUCKET__X": "1"}
    with pytest.raises(
        ConfigError, match=r"SKYVAULT_PROVISION__SETTINGS__STORE__BUCKET__X: settings\.store\.bucket"
    ):
        load_environment("dev", CONFIG_DIR, environ)


def test_published_settings_are_only_what_the_file_sets(tmp_path: Path) -> None:
    loaded: Environment = load_environment("test", write_env(tmp_path, minimal()), {})
    assert loaded.variables == {
        "skyvault_store": {"kind": "s3", "bucket": "b1", "endpoint_url": "http://127.0.0.1:9"}
    }


# --- secrets at run time --------------------------------------------------------------------------


def test_secret_paths_cover_every_secret_setting() -> None:
    assert set(secret_setting_paths()) == {
        ("store", "access_key_id"),
        ("store", "secret_access_key"),
        ("data_catalog", "password"),
        ("data_catalog", "token"),
        ("catalog", "password"),
        ("catalog", "token"),
        ("gateway", "password"),
        ("gateway", "token"),
        ("series", "password"),
    }


def test_settings_read_secrets_from_file_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in secret_files(tmp_path).items():
        monkeypatch.setenv(name, value)
    s = Settings()
    assert s.store.access_key_id is not None
    assert s.store.access_key_id.get_secret_value() == SECRET_VALUES["store.access_key_id"]
    assert s.data_catalog.password is not None
    assert s.data_catalog.password.get_secret_value() == SECRET_VALUES["data_catalog.password"]
    assert SECRET_VALUES["data_catalog.password"] not in repr(s)


def test_a_missing_secret_file_at_run_time_names_variable_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SKYVAULT_DATA_CATALOG__TOKEN_FILE", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"data_catalog\.token \(SKYVAULT_DATA_CATALOG__TOKEN_FILE\).*nope"):
        get_settings()


def test_half_a_key_pair_fails_naming_the_missing_half(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKYVAULT_STORE__ACCESS_KEY_ID", "AKID")
    with pytest.raises(
        ConfigError, match=r"store\.secret_access_key is missing.*skyvault-store-secret-access-key"
    ):
        get_settings()


# --- crash detection --------------------------------------------------------------------------------


def test_every_pool_sends_heartbeats_at_the_configured_rate(tmp_path: Path) -> None:
    body = minimal(crash_detection={"heartbeat_seconds": 40, "missing_after_seconds": 120})
    body["work_pools"]["pool-b"] = {"base_job_template": str(TEMPLATE), "job_variables": {"env": {"X": "1"}}}
    loaded = load_environment("test", write_env(tmp_path, body), {})
    assert loaded.crash_detection is not None
    assert (loaded.crash_detection.heartbeat_seconds, loaded.crash_detection.missing_after_seconds) == (
        40,
        120,
    )
    envs = {
        p.name: p.base_job_template["variables"]["properties"]["env"]["default"] for p in loaded.work_pools
    }
    assert envs == {
        "pool-a": {"SKYVAULT_PREFECT_VARIABLES": "true", HEARTBEAT_ENV: "40"},
        "pool-b": {"SKYVAULT_PREFECT_VARIABLES": "true", "X": "1", HEARTBEAT_ENV: "40"},
    }
    overridden = load_environment(
        "test",
        write_env(tmp_path, body),
        {"SKYVAULT_PROVISION__CRASH_DETECTION__HEARTBEAT_SECONDS": "60"},
    )
    for pool in overridden.work_pools:
        assert pool.base_job_template["variables"]["properties"]["env"]["default"][HEARTBEAT_ENV] == "60"


def test_without_crash_detection_the_pools_env_is_left_alone(tmp_path: Path) -> None:
    loaded = load_environment("test", write_env(tmp_path, minimal()), {})
    assert loaded.crash_detection is None
    env = loaded.work_pools[0].base_job_template["variables"]["properties"]["env"]["default"]
    assert HEARTBEAT_ENV not in env


@pytest.mark.parametrize("key", [HEARTBEAT_ENV, "PREFECT_RUNNER_HEARTBEAT_FREQUENCY"])
def test_a_pool_env_that_disagrees_with_the_heartbeat_is_refused(tmp_path: Path, key: str) -> None:
    body = minimal(crash_detection={"heartbeat_seconds": 30, "missing_after_seconds": 90})
    body["work_pools"]["pool-a"]["job_variables"]["env"] = {key: "180"}
    with pytest.raises(
        ConfigError, match=rf"pool-a: env {key}='180' disagrees with .*heartbeat_seconds \(30\)"
    ):
        load_environment("test", write_env(tmp_path, body), {})
    body["work_pools"]["pool-a"]["job_variables"]["env"] = {HEARTBEAT_ENV: "30"}
    loaded = load_environment("test", write_env(tmp_path, body), {})
    assert (
        loaded.work_pools[0].base_job_template["variables"]["properties"]["env"]["default"][HEARTBEAT_ENV]
        == "30"
    )


@pytest.mark.parametrize(
    ("crash", "message"),
    [
        (
            {"heartbeat_seconds": 30, "missing_after_seconds": 35},
            r"missing_after_seconds \(35\) must be at least",
        ),
        (
            {"heartbeat_seconds": 10, "missing_after_seconds": 90},
            r"heartbeat_seconds.*greater than or equal to 30",
        ),
        ({"heartbeat_seconds": 30}, r"missing_after_seconds.*Field required"),
    ],
)
def test_a_crash_window_that_cannot_hold_a_heartbeat_is_refused(
    tmp_path: Path, crash: dict[str, int], message: str
) -> None:
    with pytest.raises(ConfigError, match=rf"test\.yaml: crash_detection.*{message}"):
        load_environment("test", write_env(tmp_path, minimal(crash_detection=crash)), {})
