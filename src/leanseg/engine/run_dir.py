"""A run directory that a failed or concurrent command cannot damage.

- :func:`claim` takes an exclusive lock (``RUN/.lock``, holding the pid) for the life of the
  process; a second process on the same directory is refused. The kernel drops the lock when
  the process dies, even by ``kill -9``.
- :func:`remove_stale_temporaries` deletes the temporary files that a killed checkpoint write
  left behind (only possible under the lock, so no live writer owns them).
- :func:`truncate_metrics` drops the ``metrics.jsonl`` rows after the iteration a run resumes
  from, so replayed iterations are not logged twice.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from leanseg.errors import LeansegError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, concurrent use is not detected
    fcntl = None

LOCK_NAME = ".lock"
TEMPORARY_GLOB = ".*.tmp"


class RunDirError(LeansegError):
    """A run directory that is in use, or cannot be created or written."""


class RunLock:
    """An exclusive lock on a run directory; released by :meth:`release` or at process exit."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunDirError(
                f"cannot lock run directory '{self.path.parent}' ({err.strerror}): check that "
                "it exists and is writable"
            ) from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise RunDirError(
                    f"run directory '{self.path.parent}' is in use by process {holder}: wait "
                    "for it to finish (or stop it) before resuming it again"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file itself stays, empty of meaning
            self._fd = None


def claim(run_dir: Path) -> RunLock:
    """Lock ``run_dir`` for this process (a :class:`RunDirError` if another holds it)."""
    return RunLock(run_dir).acquire()


def new_run_dir(work_dir: str | Path, name: str) -> Path:
    """Create ``work_dir/name_<timestamp>[-n]`` (a one-line error when work_dir is unusable)."""
    base = Path(work_dir) / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, n = base, 1
    while run_dir.exists():
        run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1
    try:
        run_dir.mkdir(parents=True)
    except OSError as err:
        raise RunDirError(
            f"cannot create run directory '{run_dir}' ({err.strerror}): set train.work_dir to "
            "a writable directory"
        ) from None
    return run_dir


def check_work_dir(work_dir: str | Path) -> None:
    """Fail early when ``train.work_dir`` exists but is not a directory, or cannot be written."""
    path = Path(work_dir)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise RunDirError(
            f"config key 'train.work_dir': '{existing}' is a file, not a directory; set "
            "train.work_dir to a directory"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(
            f"config key 'train.work_dir': '{existing}' is not writable; set train.work_dir to "
            "a directory you can write"
        )


def check_output_file(path: Path, what: str) -> None:
    """Fail early when ``path`` cannot be written: its folder is missing, a file, or read-only,
    or ``path`` is a directory."""
    parent = path.parent
    problem = None
    if path.is_dir():
        problem = "is a directory"
    elif not parent.is_dir():
        problem = (
            f"its folder '{parent}' does not exist"
            if not parent.exists()
            else (f"'{parent}' is not a directory")
        )
    elif not os.access(parent, os.W_OK | os.X_OK):
        problem = f"its folder '{parent}' is not writable"
    if problem:
        raise RunDirError(f"{what} '{path}': {problem}; pass a writable file path")


def remove_stale_temporaries(run_dir: Path) -> tuple[int, int]:
    """Delete ``.<name>.<random>.tmp`` files of interrupted writes; returns (count, bytes)."""
    count = size = 0
    for tmp in run_dir.glob(TEMPORARY_GLOB):
        if tmp.is_file():
            size += tmp.stat().st_size
            tmp.unlink()
            count += 1
    return count, size


def truncate_metrics(path: Path, iteration: int) -> int:
    """Keep the rows of ``metrics.jsonl`` up to ``iteration`` (atomically); returns rows dropped.

    A partial last line (a write cut by ``kill -9``) is dropped too.
    """

    def keep(line: str) -> bool:
        return int(json.loads(line)["iteration"]) <= iteration

    return drop_lines(path, keep)


def drop_lines(path: Path, keep: Callable[[str], bool], *, header: int = 0) -> int:
    """Rewrite ``path`` (atomically) without the lines after the first ``header`` ones that
    ``keep`` rejects or fails on (ValueError, KeyError, TypeError, IndexError: a partial line);
    returns the lines dropped. A missing file drops nothing."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept, dropped = lines[:header], 0
    for line in lines[header:]:
        try:
            wanted = keep(line)
        except (ValueError, KeyError, TypeError, IndexError):
            wanted = False
        if wanted:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_text_atomic(path, "".join(f"{line}\n" for line in kept))
    return dropped


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
