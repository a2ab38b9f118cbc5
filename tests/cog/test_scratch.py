from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from skyvault.cog.scratch import OWNER, scratch_folder, sweep

DAY = 24 * 3600.0


def folder(scratch: Path, name: str, age_seconds: float = 0.0) -> Path:
    path = scratch / name
    (path / "part").mkdir(parents=True)
    (path / "part" / "x.tif").write_bytes(b"half a COG")
    if age_seconds:
        then = time.time() - age_seconds
        for p in (path / "part" / "x.tif", path / "part", path):
            os.utime(p, (then, then))
    return path


def test_sweep_removes_what_dead_or_long_silent_conversions_left(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(done.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = folder(scratch, f"cog-{OWNER}-{dead_pid}-P1-abc")
        running = folder(scratch, f"cog-{OWNER}-{live.pid}-P2-abc", age_seconds=3 * DAY)
        mine = folder(scratch, f"cog-{OWNER}-{os.getpid()}-P3-abc", age_seconds=3 * DAY)
        other_host_old = folder(scratch, f"cog-{'0' * 12}-{live.pid}-P4-abc", age_seconds=2 * DAY)
        other_host_recent = folder(scratch, f"cog-{'0' * 12}-{dead_pid}-P5-abc", age_seconds=60)
        unrelated = folder(scratch, "someone-elses-folder", age_seconds=3 * DAY)

        removed = sweep(scratch, stale_seconds=DAY)

        assert sorted(removed) == sorted([dead, other_host_old])
        assert not dead.exists()
        assert not other_host_old.exists()
        for kept in (running, mine, other_host_recent, unrelated):
            assert (kept / "part" / "x.tif").exists()
    finally:
        live.kill()
        live.wait()


def test_scratch_folder_is_named_for_its_owner_and_removed_after(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    with scratch_folder(scratch, "P1", "c/P1", stale_seconds=DAY) as work:
        assert work.parent == scratch
        assert work.name.startswith(f"cog-{OWNER}-{os.getpid()}-P1-")
        (work / "out.tif").write_bytes(b"x")
        assert sweep(scratch, stale_seconds=DAY) == []  # a live conversion's folder is never swept
    assert list(scratch.iterdir()) == []
