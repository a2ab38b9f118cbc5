from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect.settings import PREFECT_API_URL, temporary_settings
from rasterio.transform import from_origin

from skyvault.cli import TEMPORARY_SERVER, main
from skyvault.config.provision import limit_name, provision_tag_limits
from skyvault.config.settings import Settings, StoreSettings
from skyvault.samples import write_samples
from skyvault.storage.store import open_store
from tests.conftest import _free_port, write_raster

SKYVAULT = Path(sys.executable).with_name("skyvault")


def run_command(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the installed ``skyvault`` command with no Prefect settings but ``env`` (a fresh machine)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return subprocess.run(
        [str(SKYVAULT), *args],
        cwd=cwd,
        env={**clean, "PREFECT_HOME": str(cwd / "prefect-home"), **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_the_first_call_on_a_fresh_machine_succeeds(
    configure: Callable[..., Settings], tmp_path: Path
) -> None:
    s = configure(StoreSettings(root=tmp_path / "store"))
    yy, xx = np.mgrid[0:64, 0:64]
    write_raster(
        s.store.root / "landing" / "demo-scenes" / "TINY_20260601.tif",
        np.stack([xx * 4, yy * 4, (xx + yy) * 2]).astype("uint8"),
        transform=from_origin(10.0, 46.0, 1 / 64, 1 / 64),
        tags={"TIFFTAG_DATETIME": "2026:06:01 10:00:00"},
    )
    assert not (tmp_path / "prefect-home").exists()

    done = run_command(["ingest", "--collection", "demo-scenes", "--no-seed"], tmp_path)

    assert done.returncode == 0, done.stderr[-3000:]
    assert f"skyvault: using {TEMPORARY_SERVER}" in done.stderr
    assert "Timed out" not in done.stderr
    assert "Traceback" not in done.stderr
    summary = json.loads(done.stdout)
    assert (summary["found"], summary["done"], summary["failed"]) == (1, 1, 0)
    assert (s.store.root / "cogs" / "demo-scenes" / "TINY_20260601.tif").is_file()


@pytest.mark.usefixtures("prefect_harness")
def test_the_command_uses_the_server_in_prefect_api_url_and_provisions_its_limits(
    configure: Callable[..., Settings], tmp_path: Path
) -> None:
    api_url = PREFECT_API_URL.value()
    collection = f"cli-{os.urandom(3).hex()}"
    configure(
        StoreSettings(root=tmp_path / "store"),
        concurrency={"tag_limits": {"lts-write": 3, "data-catalog": 2}},
        collections={collection: {"title": "CLI"}},
    )
    source = tmp_path / "incoming" / "ds-cli-url"
    source.mkdir(parents=True)
    (source / "a.dat").write_bytes(b"alpha")
    try:
        done = run_command(
            ["archive", "ds-cli-url", "--source-dir", str(source), "--keep-landing"],
            tmp_path,
            PREFECT_API_URL=api_url,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"skyvault: using the Prefect server at {api_url}" in done.stderr
        assert json.loads(done.stdout)["file_count"] == 1

        with get_client(sync_client=True) as client:
            limits = {
                tag: client.read_global_concurrency_limit_by_name(limit_name(tag)).limit
                for tag in ["lts-write", "data-catalog", "catalog-write"]
            }
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["archive/ds-cli-url"]))
            )
        assert limits == {"lts-write": 3, "data-catalog": 2, "catalog-write": 4}
        assert [r.state_type.value for r in runs if r.state_type] == ["COMPLETED"]
    finally:
        provision_tag_limits(Settings())


def test_an_unreachable_prefect_server_is_named(
    configure: Callable[..., Settings], capsys: pytest.CaptureFixture[str]
) -> None:
    configure()
    url = f"http://127.0.0.1:{_free_port()}/api"
    with temporary_settings(updates={PREFECT_API_URL: url}):
        assert main(["retrieve", "ds-0042"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the Prefect server at {url}" in err


def test_invalid_settings_stop_the_command_with_their_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "skyvault.yaml"
    config.write_text("store: [unclosed\n")
    monkeypatch.setenv("SKYVAULT_CONFIG_FILE", str(config))
    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{_free_port()}/api"}):
        assert main(["retrieve", "ds-0042"]) == 2
    assert f"cannot read config file {config}" in capsys.readouterr().err


@pytest.mark.usefixtures("prefect_harness")
def test_archive_then_retrieve_from_the_command_line(
    configure: Callable[..., Settings],
    s3_store_settings: StoreSettings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure(s3_store_settings)
    source = tmp_path / "incoming" / "ds-cli"
    (source / "sub").mkdir(parents=True)
    (source / "a.dat").write_bytes(b"alpha" * 100)
    (source / "sub" / "b.dat").write_bytes(b"beta")

    assert main(["archive", "ds-cli", "--source-dir", str(source), "--keep-landing"]) == 0
    archived = json.loads(capsys.readouterr().out)
    assert archived["dataset_id"] == "ds-cli"
    assert archived["file_count"] == 2
    assert (source / "a.dat").exists()

    assert main(["retrieve", "ds-cli"]) == 0
    retrieved = json.loads(capsys.readouterr().out)
    block = retrieved["datablocks"][0]
    assert httpx.get(block["url"]).content[:1] != b""
    assert len(httpx.get(block["url"]).content) == block["size"]

    assert main(["retrieve", "never-archived"]) == 1
    assert "never-archived" in capsys.readouterr().out


@pytest.mark.usefixtures("prefect_harness")
def test_ingest_exit_code_reports_failed_products(
    configure: Callable[..., Settings], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = configure(StoreSettings(root=tmp_path / "store"))
    write_samples(open_store(s.store), broken=True)
    assert main(["ingest", "--collection", "demo-scenes", "--no-seed"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert (summary["done"], summary["failed"]) == (2, 1)
    assert main(["ingest", "--collection", "demo-dem", "--no-seed"]) == 0


@pytest.mark.usefixtures("prefect_harness")
def test_an_ingest_where_nothing_succeeds_still_prints_every_outcome(
    configure: Callable[..., Settings], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = configure(StoreSettings(root=tmp_path / "store"))
    open_store(s.store).put_bytes("landing/demo-dem/BAD_1.tif", b"not a tiff at all")
    assert main(["ingest", "--collection", "demo-dem", "--no-seed"]) == 1
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert (summary["done"], summary["failed"]) == (0, 1)
    assert summary["outcomes"][0]["product_id"] == "BAD_1"
    assert "ingest failed: 1 product: 0 done, 0 skipped, 1 failed" in err
