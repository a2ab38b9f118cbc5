"""deployment/compose.yaml: what an operator would notice breaking, read from the file.

The file is read as Compose does (YAML with merge keys, then ``${VAR}``, ``${VAR:-default}`` and
``$$`` interpolation) with the values of each ``deployment/.env.<env>.example``.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from skyvault.config.settings import secret_file_env

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENT = ROOT / "deployment"
COMPOSE = DEPLOYMENT / "compose.yaml"
ENV_FILES = sorted(DEPLOYMENT.glob(".env.*.example"))
ENVS = [p.name.removeprefix(".env.").removesuffix(".example") for p in ENV_FILES]
LOOPBACK = "127.0.0.1"

_VAR = re.compile(r"\$(\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\})")


def env_file(env: str) -> dict[str, str]:
    """The variables an ``.env.<env>.example`` defines (uncommented ``KEY=VALUE`` lines)."""
    values: dict[str, str] = {}
    for line in (DEPLOYMENT / f".env.{env}.example").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def interpolate(value: Any, variables: dict[str, str]) -> Any:
    if isinstance(value, str):

        def one(m: re.Match[str]) -> str:
            if m.group(1) == "$":
                return "$"
            name, default = m.group(2), m.group(3)
            if variables.get(name):
                return variables[name]
            if default is not None:
                return default
            raise AssertionError(f"{COMPOSE}: ${{{name}}} is not set and has no default")

        return _VAR.sub(one, value)
    if isinstance(value, dict):
        return {interpolate(k, variables): interpolate(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, variables) for v in value]
    return value


def raw() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def compose(env: str) -> dict[str, Any]:
    """The file as Compose sees it with ``--env-file deployment/.env.<env>.example``."""
    data = interpolate(raw(), env_file(env))
    assert isinstance(data, dict)
    return data


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def secret_names(service: dict[str, Any]) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}


def option(cmd: list[str], name: str) -> str:
    assert name in cmd, f"{name} missing in {cmd}"
    return cmd[cmd.index(name) + 1]


def workers(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: s for name, s in data["services"].items() if command(s)[:3] == ["prefect", "worker", "start"]
    }


def pools_of(env: str) -> dict[str, Any]:
    config = yaml.safe_load((ROOT / "config" / f"{env}.yaml").read_text(encoding="utf-8"))
    pools = config["work_pools"]
    assert isinstance(pools, dict)
    return pools


def test_both_environments_have_an_example_env_file() -> None:
    assert set(ENVS) == {"dev", "prod"}


def test_every_variable_used_is_defined_in_every_env_file() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    used = {m.group(2) for m in _VAR.finditer(text) if m.group(2)}
    assert used, "compose.yaml uses no variables: the env files are not read"
    for env in ENVS:
        defined = env_file(env)
        missing = sorted(v for v in used if not defined.get(v))
        assert not missing, f".env.{env}.example does not define {missing}, used in {COMPOSE}"


@pytest.mark.parametrize("env", ENVS)
def test_every_service_uses_the_host_network(env: str) -> None:
    services = compose(env)["services"]
    assert services
    for name, service in services.items():
        assert service.get("network_mode") == "host", f"service {name} is not on the host network"
        assert "ports" not in service, name
        assert "networks" not in service, name
        build = service.get("build")
        if build:
            assert build.get("network") == "host", f"service {name} builds without the host network"


@pytest.mark.parametrize("env", ENVS)
def test_servers_listen_on_loopback_and_clients_target_it(env: str) -> None:
    data = compose(env)
    server = data["services"]["prefect-server"]
    cmd = shlex.split(command(server)[-1]) if command(server)[0] == "sh" else command(server)
    start = cmd[cmd.index("prefect") :]
    assert start[:3] == ["prefect", "server", "start"]
    assert option(start, "--host") == LOOPBACK
    port = option(start, "--port")
    server_env = environment(server)
    assert server_env["PREFECT_SERVER_API_HOST"] == LOOPBACK
    assert server_env["PREFECT_SERVER_DATABASE_HOST"] == LOOPBACK

    postgres = data["services"]["postgres"]
    assert f"listen_addresses={LOOPBACK}" in command(postgres)
    assert f"port={server_env['PREFECT_SERVER_DATABASE_PORT']}" in command(postgres)

    for name, service in data["services"].items():
        if name in ("postgres", "prefect-server"):
            continue
        assert environment(service).get("PREFECT_API_URL") == f"http://{LOOPBACK}:{port}/api", name
    text = yaml.safe_dump(data)
    hosts = set(re.findall(r"https?://([^/:'\"\s]+)", text))
    hosts |= set(re.findall(r"(?:--host|listen_addresses=)\s*([^\s'\"]+)", text))
    assert hosts == {LOOPBACK}, f"addresses other than {LOOPBACK}: {sorted(hosts - {LOOPBACK})}"


@pytest.mark.parametrize("env", ENVS)
def test_the_server_keeps_its_leases_on_a_volume_and_its_data_in_postgres(env: str) -> None:
    data = compose(env)
    server = environment(data["services"]["prefect-server"])
    assert server["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"] == (
        "prefect.server.concurrency.lease_storage.filesystem"
    )
    mounts = {v.split(":")[1]: v.split(":")[0] for v in data["services"]["prefect-server"]["volumes"]}
    assert mounts.get(server["PREFECT_HOME"]), (
        "PREFECT_HOME is not on a volume: leases die with the container"
    )
    assert server["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    postgres_data = data["services"]["postgres"]["volumes"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres_data)


@pytest.mark.parametrize("env", ENVS)
def test_one_docker_worker_per_pool_the_config_creates(env: str) -> None:
    data = compose(env)
    found = workers(data)
    served = [option(command(s), "--pool") for s in found.values()]
    pools = pools_of(env)
    assert sorted(served) == sorted(pools), (
        f"workers serve {sorted(served)}, config/{env}.yaml has {sorted(pools)}"
    )
    for name, service in found.items():
        pool = option(command(service), "--pool")
        assert option(command(service), "--type") == pools[pool].get("type", "docker"), name
        assert "/var/run/docker.sock:/var/run/docker.sock" in service.get("volumes", []), name
        depends = service.get("depends_on", {})
        assert depends.get("provision", {}).get("condition") == "service_completed_successfully", (
            f"{name} may start before the config job made its pool (it would make one from defaults)"
        )


@pytest.mark.parametrize("env", ENVS)
def test_the_config_job_runs_an_environment_that_has_a_config_file(env: str) -> None:
    data = compose(env)
    job = data["services"]["provision"]
    cmd = command(job)
    assert cmd[0] == "skyvault-provision"
    chosen = option(cmd, "--env")
    assert chosen == env
    assert (ROOT / "config" / f"{chosen}.yaml").is_file()
    # without an env file Compose falls back to the default: it must exist too
    default = interpolate(raw(), {**env_file(env), "SKYVAULT_ENV": ""})["services"]["provision"]
    assert (ROOT / "config" / f"{option(command(default), '--env')}.yaml").is_file()

    # the config folder and every base job template it names are mounted where the job reads them
    mounts = {
        PurePosixPath(v.split(":")[1]): (COMPOSE.parent / v.split(":")[0]).resolve() for v in job["volumes"]
    }
    config_dir = PurePosixPath(option(cmd, "--config-dir"))
    assert mounts[config_dir] == ROOT / "config"
    for pool, spec in pools_of(chosen).items():
        target = PurePosixPath(*(config_dir / spec["base_job_template"]).parts)
        resolved = _normalise(target)
        host = next(
            (src / resolved.relative_to(dst) for dst, src in mounts.items() if resolved.is_relative_to(dst)),
            None,
        )
        assert host is not None, f"pool {pool}: {resolved} is not mounted into the config job"
        assert host.is_file(), f"pool {pool}: {resolved} is not mounted into the config job"
    assert job.get("depends_on", {}).get("prefect-server", {}).get("condition") == "service_healthy"
    assert "build" in job
    assert job["build"]["dockerfile"] == "runtime.Dockerfile"
    assert (COMPOSE.parent / job["build"]["context"] / job["build"]["dockerfile"]).resolve().is_file()


def _normalise(path: PurePosixPath) -> PurePosixPath:
    parts: list[str] = []
    for part in path.parts:
        if part == "..":
            parts.pop()
        elif part != ".":
            parts.append(part)
    return PurePosixPath(*parts)


@pytest.mark.parametrize("env", ENVS)
def test_every_secret_the_config_job_reads_is_provided_as_a_file(env: str) -> None:
    data = compose(env)
    job = data["services"]["provision"]
    job_env = environment(job)
    config = yaml.safe_load((ROOT / "config" / f"{env}.yaml").read_text(encoding="utf-8"))
    needed = config.get("secrets") or {}
    assert needed
    for setting, source in needed.items():
        variable = (source or {}).get("file_env") or secret_file_env(tuple(setting.split(".")))
        path = job_env.get(variable)
        assert path, f"secret {setting}: the config job has no {variable}"
        assert path.startswith("/run/secrets/"), f"{variable}={path} is not a Compose secret"
        name = path.removeprefix("/run/secrets/")
        assert name in secret_names(job), f"secret {setting}: {name} is not given to the config job"
        file = Path(data["secrets"][name]["file"])
        assert (COMPOSE.parent / file).resolve().is_relative_to(DEPLOYMENT / "secrets" / env), file


@pytest.mark.parametrize("env", ENVS)
def test_every_secret_file_a_service_names_is_given_to_it(env: str) -> None:
    data = compose(env)
    for name, service in data["services"].items():
        text = yaml.safe_dump({"c": service.get("command"), "e": service.get("environment")})
        for secret in set(re.findall(r"/run/secrets/([A-Za-z0-9_.-]+)", text)):
            assert secret in secret_names(service), (
                f"service {name} reads /run/secrets/{secret} it is not given"
            )
            assert "file" in data["secrets"][secret], secret
        for secret in secret_names(service):
            assert secret in data["secrets"], f"service {name}: secret {secret} is not defined"


@pytest.mark.parametrize("env", ENVS)
def test_the_gateway_listens_on_loopback_with_its_credentials_as_secret_files(env: str) -> None:
    data = compose(env)
    gateway = data["services"]["gateway"]
    cmd = command(gateway)
    assert cmd[0] == "skyvault-api"
    assert option(cmd, "--host") == LOOPBACK
    port = option(cmd, "--port")
    assert port == env_file(env)["GATEWAY_PORT"]
    probe = " ".join(str(part) for part in gateway["healthcheck"]["test"])
    assert f"http://{LOOPBACK}:{port}/health" in probe
    gateway_env = environment(gateway)
    for setting in (("gateway", "password"), ("gateway", "token")):
        path = gateway_env[secret_file_env(setting)]
        name = path.removeprefix("/run/secrets/")
        assert name in secret_names(gateway), f"{setting}: {name} is not given to the gateway"
        file = Path(data["secrets"][name]["file"])
        assert (COMPOSE.parent / file).resolve().is_relative_to(DEPLOYMENT / "secrets" / env), file
    assert gateway_env["SKYVAULT_GATEWAY__USERNAME"]
    # its store settings come from what the config job provisioned
    assert gateway_env["SKYVAULT_PREFECT_VARIABLES"] == "true"
    assert gateway["depends_on"]["provision"]["condition"] == "service_completed_successfully"
