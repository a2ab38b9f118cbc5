from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from skyvault.cli import main
from skyvault.config.settings import Settings, StoreSettings
from skyvault.samples import write_samples
from skyvault.storage.store import open_store

pytestmark = pytest.mark.usefixtures("prefect_harness")


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


def test_ingest_exit_code_reports_failed_products(
    configure: Callable[..., Settings], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = configure(StoreSettings(root=tmp_path / "store"))
    write_samples(open_store(s.store), broken=True)
    assert main(["ingest", "--collection", "demo-scenes", "--no-seed"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert (summary["done"], summary["failed"]) == (2, 1)
    assert main(["ingest", "--collection", "demo-dem", "--no-seed"]) == 0
