"""Timing and reporting helpers shared by the benchmarks (standard library only).

A bench's parent process stays small and imports neither skyvault nor GDAL: every measured run is
a child process, so the peak RSS that ``wait4`` reports for it is the child's own, not a copy of a
large parent's. Helpers here:

* :func:`run_child`: run a command, return its wall time, CPU time, peak RSS and output;
* :func:`rotation`: the order of the tools in each repetition (every tool takes every position);
* :class:`Samples` and :func:`cell`: median with the spread (min-max) of repeated measurements;
* :func:`markdown_table` and :func:`write_report`: the table for ``bench/out/`` and stdout;
* :func:`prefect_server`: a Prefect server on 127.0.0.1 for the benches' flow rows.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "bench" / "out"
MB = 1_000_000


@dataclass(frozen=True)
class ChildRun:
    """One child process: wall and CPU seconds, peak RSS (MB), exit status and output."""

    wall: float
    cpu: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str

    def report(self) -> dict[str, Any]:
        """The JSON object on the child's last stdout line (what it measured from inside)."""
        for line in reversed(self.stdout.strip().splitlines()):
            if line.startswith("{"):
                value: dict[str, Any] = json.loads(line)
                return value
        raise SystemExit(f"child printed no JSON report:\n{self.stdout}\n{self.stderr}")


def run_child(
    cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, check: bool = True
) -> ChildRun:
    """Run ``cmd`` as a fresh process and measure it with ``wait4``.

    Wall time is from start to exit as seen here; CPU time (user + system) and peak RSS are the
    child's own resource usage (including its children's, for a shell pipeline only the largest
    process's peak counts).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, env=env, cwd=cwd or REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        run = ChildRun(
            wall=wall,
            cpu=usage.ru_utime + usage.ru_stime,
            peak_rss_mb=usage.ru_maxrss * 1024 / MB,
            returncode=proc.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
        )
    if check and run.returncode != 0:
        raise SystemExit(
            f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
        )
    return run


def own_peak_rss_mb() -> float:
    """Peak RSS of this process (MB): a child started by it can report no less than this."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB


def rotation(names: Sequence[str], rep: int) -> list[str]:
    """The order of ``names`` in repetition ``rep``: rotated by one each time."""
    k = rep % len(names)
    return [*names[k:], *names[:k]]


@dataclass
class Samples:
    """Repeated measurements of one quantity."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def __bool__(self) -> bool:
        return bool(self.values)


def cell(samples: Samples, digits: int = 2) -> str:
    """``median (min-max)`` of the samples, or an empty cell when there are none."""
    if not samples:
        return ""
    if len(samples.values) == 1:
        return f"{samples.median:.{digits}f}"
    return f"{samples.median:.{digits}f} ({samples.low:.{digits}f}-{samples.high:.{digits}f})"


def ratio(numerator: Samples, denominator: Samples) -> str:
    """Ratio of the medians, with the range of the ratios of the paired (same repetition) runs."""
    if not numerator or not denominator:
        return ""
    paired = [a / b for a, b in zip(numerator.values, denominator.values, strict=False) if b]
    text = f"{numerator.median / denominator.median:.3f}"
    if len(paired) > 1:
        text += f" ({min(paired):.2f}-{max(paired):.2f})"
    return text


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    """A markdown table; columns from ``numeric_from`` on are right-aligned."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line() -> str:
    """CPUs, Python and the load average now (the benches run on shared machines)."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}, "
        f"load average {load}"
    )


def write_report(name: str, text: str) -> Path:
    """Print ``text`` and write it to ``bench/out/<name>.md``."""
    print()
    print(text)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{name}.md"
    path.write_text(text.rstrip() + "\n", encoding="utf-8")
    print(f"\nwritten to {path}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    return _answers(f"{url}/health")


def _postgres_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise SystemExit("PostgreSQL is not installed (no initdb); run scripts/setup-system.sh")
    return Path(initdb).parent


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run as the ``postgres`` user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def postgres_cluster(root: Path) -> Iterator[int]:
    """A private PostgreSQL cluster under ``root`` on 127.0.0.1 (user ``postgres``); yields its port."""
    bindir = _postgres_bin()
    data = root / "pgdata"
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    port = free_port()
    run = functools.partial(subprocess.run, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    run(_as_postgres_user([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]))
    options = f"-p {port} -h 127.0.0.1 -k {root}"
    ctl = [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "postgres.log")]
    run(_as_postgres_user([*ctl, "-o", options, "-w", "start"]))
    try:
        yield port
    finally:
        run(_as_postgres_user([*ctl, "-m", "fast", "-w", "stop"]))


def create_database(port: int, name: str) -> str:
    """Create database ``name`` in the cluster on ``port``; returns its libpq DSN."""
    subprocess.run(
        _as_postgres_user([str(_postgres_bin() / "createdb"), "-h", "127.0.0.1", "-p", str(port), name]),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    return f"postgresql://postgres@127.0.0.1:{port}/{name}"


def drop_database(port: int, name: str) -> None:
    """Drop database ``name`` of the cluster on ``port`` (its disk space goes back at once)."""
    subprocess.run(
        _as_postgres_user([str(_postgres_bin() / "dropdb"), "-h", "127.0.0.1", "-p", str(port), name]),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )


def copy_database(port: int, template: str, name: str) -> str:
    """A fresh database copied from ``template`` (pgstac and the collection, no item)."""
    subprocess.run(
        _as_postgres_user(
            [str(_postgres_bin() / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-T", template, name]
        ),
        check=True,
        capture_output=True,
    )
    return f"postgresql://postgres@127.0.0.1:{port}/{name}"


@contextlib.contextmanager
def postgres(root: Path) -> Iterator[str]:
    """A private PostgreSQL cluster under ``root`` on 127.0.0.1; yields a SQLAlchemy URL for Prefect."""
    with postgres_cluster(root) as port:
        create_database(port, "prefect")
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect"


def migrate_pgstac(dsn: str) -> None:
    """Install pgstac (and the PostGIS, btree_gist and unaccent extensions) into the database."""
    subprocess.run(
        [str(Path(sys.executable).parent / "pypgstac"), "migrate", "--dsn", dsn],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@contextlib.contextmanager
def pgstac(root: Path, database: str = "catalog") -> Iterator[str]:
    """A private PostgreSQL cluster with a pgstac database; yields its DSN."""
    with postgres_cluster(root) as port:
        dsn = create_database(port, database)
        migrate_pgstac(dsn)
        yield dsn


@contextlib.contextmanager
def stac_api(dsn: str, log_path: Path, startup_seconds: float = 120) -> Iterator[str]:
    """stac-fastapi-pgstac with transactions on the pgstac database ``dsn``, on 127.0.0.1; yields its URL."""
    parts = urllib.parse.urlsplit(dsn)
    port = free_port()
    env = {
        **os.environ,
        "PGUSER": parts.username or "postgres",
        "PGPASSWORD": parts.password or "",
        "PGHOST": parts.hostname or "127.0.0.1",
        "PGPORT": str(parts.port or 5432),
        "PGDATABASE": parts.path.lstrip("/"),
        "ENABLE_TRANSACTIONS_EXTENSIONS": "true",
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "stac_fastapi.pgstac.app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + startup_seconds
            while not _answers(f"{url}/_mgmt/ping"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"stac-fastapi-pgstac did not start; see {log_path}")
                time.sleep(0.5)
            yield url
        finally:
            _stop_group(proc)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


DATABASES = ("sqlite", "postgres")


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """``--api-url`` and ``--database``: which Prefect server the flow rows talk to."""
    parser.add_argument("--api-url", help="Prefect API of a running server (default: start one here)")
    parser.add_argument(
        "--database",
        choices=DATABASES,
        default="sqlite",
        help="database of the server started here: SQLite (the embedded default) or a private "
        "PostgreSQL cluster (the production setup)",
    )


def server_label(api_url: str | None, database: str) -> str:
    """How a report names the server the flow rows ran against."""
    return "--api-url" if api_url else {"sqlite": "SQLite", "postgres": "PostgreSQL"}[database]


@contextlib.contextmanager
def prefect_server(
    api_url: str | None = None, database: str = "sqlite", startup_seconds: float = 240
) -> Iterator[str]:
    """The API URL of a Prefect server: ``api_url`` if given, else one started here for the duration.

    A started server listens on 127.0.0.1 in a temporary ``PREFECT_HOME``, with a fresh SQLite
    database there or (``database="postgres"``) a private PostgreSQL cluster, and is stopped (by
    its pid) afterwards.
    """
    if api_url:
        yield api_url
        return
    home = Path(tempfile.mkdtemp(prefix="skyvault-bench-prefect-"))
    os.chmod(home, 0o755)  # the PostgreSQL user must reach its data folder
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, home, ignore_errors=True)
        env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
        }
        env.pop("PREFECT_API_URL", None)
        if database == "postgres":
            env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = stack.enter_context(postgres(home / "postgres"))
        port = free_port()
        log = stack.enter_context((home / "server.log").open("wb"))
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopping it stops what it started
        )
        stack.callback(_stop_group, proc)
        url = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + startup_seconds
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the Prefect server did not start; see {home / 'server.log'}")
            time.sleep(1)
        print(f"Prefect server at {url} ({server_label(None, database)})", flush=True)
        yield url


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop ``proc`` and the processes it started (its process group, by its id)."""
    for sig, wait in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a service started with ``start_new_session=True`` and what it started (by its id)."""
    _stop_group(proc)


def flow_env(api_url: str, **extra: str) -> dict[str, str]:
    """The environment of a child that runs flows against ``api_url``."""
    return {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **extra,
    }
