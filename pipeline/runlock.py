"""One training process per run directory: an flock on RUN_DIR/.lock, held by the run's rank 0
while it trains, which the kernel releases when the holder exits, however it exits."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import socket
import warnings


@contextlib.contextmanager
def only_run_in(run_dir: pathlib.Path, comm):
    """Hold run_dir's lock while the block runs; a FileExistsError naming the holder on every rank
    when another process holds it. A second `ndde resume` of a run still training (in another
    terminal, or as a Slurm job) used to train the same steps again and write over its
    checkpoints. Where the file system has no locks: a warning, and the run goes on."""
    handle, refused = None, None
    if comm is None or comm.Get_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
        except BlockingIOError:
            refused = (f"{run_dir} is in use: {_holder(handle)} is training it ({run_dir / '.lock'}). Wait for it "
                       f"(`ndde status {run_dir}`), stop it, or choose another --run-dir")
        except OSError as err:  # e.g. ENOLCK on an NFS mount without a lock daemon
            warnings.warn(f"cannot lock {run_dir / '.lock'} ({err}); make sure no other process trains {run_dir}")
    if comm is not None:
        refused = comm.bcast(refused, root=0)
    try:
        if refused:
            err = FileExistsError(refused)
            err.root = comm is None or comm.Get_rank() == 0  # every rank raises it; rank 0 reports it
            raise err
        yield
    finally:
        if handle is not None:
            handle.close()


def _holder(handle) -> str:
    handle.seek(0)
    return handle.read().strip() or "a process"


def training_now(run_dir) -> str | None:
    """Who holds run_dir's lock ("pid 123 on node7"), or None when no process trains it."""
    path = pathlib.Path(run_dir) / ".lock"
    if not path.exists():
        return None
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released at once, by the close
        except BlockingIOError:
            return _holder(handle)
        except OSError:
            return None
    return None
