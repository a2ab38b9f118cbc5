"""Scratch folders for conversions: owned, swept when their owner is gone, checked for space.

A conversion works in ``<scratch_dir>/cog-<owner>-<pid>-<product>-<random>``, where ``owner``
identifies this host and process namespace (boot id, pid namespace, host name) and ``pid`` the
converting process. The folder is removed when the conversion ends; a process killed meanwhile
cannot remove it, so every new conversion first sweeps the scratch folder: a folder of this owner
whose process is gone (or whose pid now belongs to a younger process) is removed at once, and a
folder of another owner (another host or container sharing the disk) once nothing in it changed
for ``stale_seconds``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from skyvault.errors import ScratchSpaceError, StorageError

_PREFIX = "cog-"
_NAME = re.compile(r"^cog-([0-9a-f]{12})-(\d+)-")
#: Messages by which GDAL and libtiff report a write that the disk refused.
_OUT_OF_SPACE = re.compile(
    r"no space left|disk full|not enough space|TIFFAppendToStrip:\s*(seek|write) error|"
    r"TIFFWrite\w*:.*(seek|write) error|failed to write|write error",
    re.IGNORECASE,
)


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _owner() -> str:
    """A short id of this host, boot and pid namespace: pids are only comparable within it."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    seed = "\n".join((socket.gethostname(), _read("/proc/sys/kernel/random/boot_id"), namespace))
    return hashlib.sha256(seed.encode()).hexdigest()[:12]


OWNER = _owner()


def _started_at(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds), where ``/proc`` tells; else None."""
    stat = _read(f"/proc/{pid}/stat")
    btime = [line.split()[1] for line in _read("/proc/stat").splitlines() if line.startswith("btime ")]
    boot = btime[0] if btime else ""
    if not stat or not boot:
        return None
    try:
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
        return int(boot) + ticks / os.sysconf("SC_CLK_TCK")
    except (IndexError, ValueError, OSError):
        return None


def _alive(pid: int, since: float) -> bool:
    """True if ``pid`` runs and is the process that existed at ``since`` (not a reused pid)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = _started_at(pid)
    return started is None or started <= since + 1.0


def _last_change(folder: Path) -> float:
    newest = folder.lstat().st_mtime
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


def _stale(folder: Path, stale_seconds: float, now: float) -> bool:
    try:
        created = folder.lstat().st_ctime
        last = _last_change(folder)
    except FileNotFoundError:
        return False
    m = _NAME.match(folder.name)
    if m is not None and m.group(1) == OWNER:
        return not _alive(int(m.group(2)), created)
    return now - last > stale_seconds


def sweep(scratch_dir: Path, stale_seconds: float) -> list[Path]:
    """Remove conversion folders left in ``scratch_dir`` by processes that are gone.

    Returns:
        The folders removed.

    """
    removed: list[Path] = []
    now = time.time()
    try:
        entries = list(os.scandir(scratch_dir))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        folder = Path(entry.path)
        if _stale(folder, stale_seconds, now):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


@contextlib.contextmanager
def scratch_folder(scratch_dir: Path, name: str, label: str, stale_seconds: float) -> Iterator[Path]:
    """A fresh folder for one conversion in ``scratch_dir``, removed afterwards.

    Folders left by dead conversions are swept first.

    Raises:
        ScratchSpaceError: the scratch disk is full.
        StorageError: the folder cannot be created.

    """
    try:
        scratch_dir.mkdir(parents=True, exist_ok=True)
        sweep(scratch_dir, stale_seconds)
        work = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{OWNER}-{os.getpid()}-{name}-", dir=scratch_dir))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ScratchSpaceError(
                f"product {label}: no space left on the scratch disk at {scratch_dir} for a conversion folder"
            ) from e
        raise StorageError(f"product {label}: cannot create a scratch folder in {scratch_dir}: {e}") from e
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def free_bytes(path: Path) -> int:
    """Bytes free for this user on the file system holding ``path``."""
    return shutil.disk_usage(path).free


def check_space(work: Path, needed: int, label: str, what: str) -> None:
    """Fail before converting when the scratch disk has less than ``needed`` bytes free.

    Raises:
        ScratchSpaceError: fewer than ``needed`` bytes are free; names the folder and both numbers.

    """
    free = free_bytes(work)
    if free < needed:
        raise space_error(work, needed, label, what, free)


def is_out_of_space(error: BaseException) -> bool:
    """True if ``error`` (an OSError or a GDAL error) says the disk refused a write."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return _OUT_OF_SPACE.search(str(error)) is not None


def space_error(work: Path, needed: int, label: str, what: str, free: int | None = None) -> ScratchSpaceError:
    """The error for a scratch disk without room: names the folder, the bytes needed and free."""
    if free is None:
        with contextlib.suppress(OSError):
            free = free_bytes(work)
    have = f", {free} bytes are free" if free is not None else ""
    return ScratchSpaceError(
        f"product {label}: no space left on the scratch disk at {work}: {what} needs about {needed} "
        f"bytes{have}; free some space or set scratch_dir (SKYVAULT_SCRATCH_DIR) to a larger disk"
    )
