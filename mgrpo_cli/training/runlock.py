"""One process per run folder: an fcntl lock on ``<run>/run.lock``.

``mgrpo train`` takes the lock of its run folder before it reads or writes anything there (for
``resume=<run>`` and an explicit ``hydra.run.dir``, before Hydra starts the job), and holds it until
the process ends. A second ``mgrpo train`` or ``resume=`` on that folder stops at once with one line
naming the holder's pid (exit 2). The lock is the kernel's (``fcntl.lockf``, a POSIX record lock): a
process that dies, SIGKILL included, releases it, so a SLURM requeue after the old job died finds
the folder free; a stale ``run.lock`` file means nothing. Processes the holder forks (the grader's
worker, data loader workers) do not inherit a POSIX lock, and the other ranks of a DDP job do not take
it: rank 0 holds it for the job.

Only the process that holds the lock may open ``run.lock`` (closing any descriptor of the file releases
a POSIX lock): this module keeps the one descriptor.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from mgrpo_cli.errors import UserError

LOCK = "run.lock"
_held: dict[Path, int] = {}  # folder -> the open descriptor holding its lock


def is_rank_zero() -> bool:
    """Whether this process is the job's rank 0 by its launcher's variables (Lightning's DDP children get
    LOCAL_RANK; torchrun RANK; other nodes NODE_RANK; srun tasks SLURM_PROCID)."""
    return all(os.environ.get(var, "0") == "0" for var in ("LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID"))


def lock(folder: str | Path, key: str) -> bool:
    """Hold the lock of ``folder`` for this process; False when it holds it already. ``key`` is how the
    command line named the folder (``resume``, ``hydra.run.dir``), for the one-line error when another
    process holds it."""
    folder = Path(folder).resolve()
    if folder in _held:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        who = f"process {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") if holder else "another process"
        raise UserError(f"{key}={folder}: this run folder is in use by {who}; one mgrpo train runs in a folder "
                        f"at a time (wait for it to end, or stop it)") from None
    try:  # who holds it, for the other process's error line (the lock itself needs no bytes)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode(), 0)
    except OSError:
        pass
    _held[folder] = fd
    return True


def release(folder: str | Path) -> None:
    """Let go of the lock of ``folder`` (a process's exit does it too)."""
    fd = _held.pop(Path(folder).resolve(), None)
    if fd is not None:
        os.close(fd)
