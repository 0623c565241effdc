"""One writer per run directory: rank 0 holds an exclusive `flock` on `output_dir/run.lock`.

The kernel drops the lock when the holding process dies (kill -9 included), so a crashed run never
leaves a stale lock, while a run whose ranks are still alive (orphans of a killed launcher) keeps
it: a relaunch cannot delete their in-progress checkpoint or truncate their metrics under them.
The file names the holder ("host H, pid P") for the error a second job gets. Shared filesystems
must support flock (NFS does; Lustre needs the `flock` mount option): otherwise locking fails with
the reason instead of running unprotected.
"""

from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

import torch.distributed as dist

from ioe_train.config import ConfigError

LOCK_NAME = "run.lock"


def _busy(path: Path, f: IO[str]) -> ConfigError:
    f.seek(0)
    holder = f.read().strip() or "a process that is just starting"
    return ConfigError(f"output_dir: {path.parent} is in use by another run ({holder}); "
                       "wait for it to end, kill it, or use another output_dir")  # fmt: skip


def _try_lock(path: Path, f: IO[str]) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:  # ENOLCK / ENOSYS: a filesystem without locks
        raise ConfigError(f"output_dir: cannot lock {path} ({e.strerror}); use a filesystem with "
                          "flock support (Lustre: mount with -o flock)") from None  # fmt: skip
    return True


def lock_run_dir(output_dir: Path) -> IO[str]:
    """Lock `output_dir` for this process while the returned file stays open; ConfigError if held."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_NAME
    f = open(path, "a+")
    if not _try_lock(path, f):
        error = _busy(path, f)
        f.close()
        raise error
    f.seek(0)
    f.truncate()
    f.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
    f.flush()
    return f


def check_run_dir_free(output_dir: Path) -> None:
    """Raise ConfigError naming the holder if a live run holds `output_dir` (creates nothing)."""
    path = output_dir / LOCK_NAME
    if not path.exists():
        return
    with open(path, "a+") as f:  # NFS emulates flock with POSIX locks: exclusive needs a writable fd
        if not _try_lock(path, f):
            raise _busy(path, f)


@contextmanager
def run_dir_lock(output_dir: Path, rank: int) -> Iterator[None]:
    """Collective: rank 0 holds the lock for the block; on every rank, ConfigError if it is held."""
    handle, error = None, None
    if rank == 0:
        try:
            handle = lock_run_dir(output_dir)
        except ConfigError as e:
            error = str(e)
    message = [error]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise ConfigError(message[0])
    try:
        yield
    finally:
        if handle is not None:
            handle.close()
