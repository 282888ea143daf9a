"""Shards as Dask tasks: an embedded LocalCluster (worker processes, one thread each,
loopback only) or an existing scheduler. Shard w prefers worker w, which caches its rows
and compiled step. A task is a pure function of theta and the step, so any worker may
compute it again with the same result: when its worker dies the scheduler reruns it on
another, and a shard that no live worker runs (every worker died at once) is submitted
again to the workers that come back. No wait is unbounded: a step gives up (StepAbandoned)
after backend.worker_timeout seconds without a worker for a lost shard, and after a stop
signal once a shard is lost or STOP_GRACE_S have passed."""

from __future__ import annotations

import os
import signal
import sys
import time

from distributed import KilledWorker, WorkerPlugin, wait

from ..config import from_toml_text
from . import DriverBackend, StepAbandoned, reduce_in_order

# How often a step that waits for its shards looks at the cluster and at its stop signal.
POLL_S = 0.5
# A done shard's result (its gradient: KBs to MBs here) comes from its worker within this;
# a fetch that takes longer is dropped (its worker died holding it) and the shard waits again.
FETCH_S = 5.0
# After SIGTERM/SIGUSR1 the step in flight may still finish (and be checkpointed) for this
# long while its workers are up; it leaves time for the checkpoint under Slurm's default
# KillWait (30 s from SIGTERM to SIGKILL).
STOP_GRACE_S = 10.0
# Each of client.close() and cluster.close(): a cluster with dead, hung or restarting
# workers must not keep a stopping run from exiting.
CLOSE_TIMEOUT_S = 10.0

# distributed's nanny exports MALLOC_TRIM_THRESHOLD_=65536 to every worker it spawns. Setting
# any malloc tunable turns off glibc's adaptive mmap threshold, so each of XLA's multi-MiB
# temporaries is mmap'd and page-faulted afresh: a Backprop gradient ran 2.1x slower in a
# worker (86 vs 41 ms, bench/README.md). Workers keep glibc's defaults (None unsets it).
_UNSET_MALLOC_TRIM = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
_UNSET_MALLOC_TRIM_ENV = """export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON='{"MALLOC_TRIM_THRESHOLD_": None}'"""


_PINNED = []


class IgnoreCtrlC(WorkerPlugin):
    """A worker plugin for the embedded cluster: its worker processes share the terminal's
    process group, so Ctrl-C killed them mid-step (tracebacks, a lost step) while the driver
    was finishing the step to checkpoint it. The driver alone handles SIGINT."""

    def setup(self, worker):
        import threading

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pin_once(index, shards, config_text):
    """Before this worker's first JAX computation: its GPU, or (no GPU) its block of cores."""
    from .. import devices

    if _PINNED:
        return
    _PINNED.append(index)
    if devices.pin(index) is None and from_toml_text(config_text).backend.pin_cpus:
        devices.pin_cpus(index, shards)


def _shard_task(config_text, data_path, shard, shards, flat_theta, step, expect=()):
    from distributed import get_worker

    from ..shard import worker_for

    name = get_worker().name
    _pin_once(int(name) if str(name).isdigit() else None, shards, config_text)
    # fault injection: "STEP:MARKER" dies once (the marker file records it), "STEP:always" each time
    kill = os.environ.get("NDDE_TEST_KILL_WORKER", "")
    if kill and shard == shards - 1:
        kill_step, marker = kill.split(":", 1)
        if int(kill_step) == step and (marker == "always" or not os.path.exists(marker)):
            if marker != "always":
                open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
    return worker_for(config_text, data_path, shard, shards, expect).compute(flat_theta, step)


def slurm_cluster(config_text: str, log_dir=None):
    """dask-jobqueue's SLURMCluster (not yet scaled): one Slurm job per worker (one process,
    one thread), resources from the job's [slurm] section; the scheduler runs in this process."""
    import sys

    from dask_jobqueue import SLURMCluster

    s = from_toml_text(config_text).slurm
    directives = [f"--cpus-per-task={s.cpus_per_task}"] + list(s.extra)
    if s.gpus_per_node:
        directives.append("--gpus-per-node=1")
    cluster = SLURMCluster(cores=1, processes=1, memory=_dask_memory(s.mem),
                           walltime=s.time, queue=s.partition or None, account=s.account or None,
                           job_extra_directives=directives, python=sys.executable,
                           job_name=f"{s.job_name or 'ndde'}-worker", worker_extra_args=["--nthreads", "1"],
                           job_script_prologue=[_UNSET_MALLOC_TRIM_ENV],
                           log_directory=None if log_dir is None else str(log_dir))
    return cluster


def _dask_memory(mem: str) -> str:
    """Slurm's --mem (bare number: megabytes) in dask's notation."""
    if not mem:
        return "2GB"
    return mem + "MB" if mem.isdigit() else mem + "B"


class _Patience:
    """When a step that waits for its shards gives up (StepAbandoned): once a stop signal has
    come and a shard is lost (its worker gone, no other running it) or STOP_GRACE_S have
    passed since the signal; without a signal, once lost shards have had no live worker to
    run them for worker_timeout seconds."""

    def __init__(self, worker_timeout: float):
        self.worker_timeout = worker_timeout
        self.signal_at = self.no_worker_since = None

    def check(self, lost: list, live: list, signal_name: str | None):
        now = time.monotonic()
        if signal_name is not None:
            self.signal_at = self.signal_at or now
            if lost:
                raise StepAbandoned(f"its shard(s) {_listed(lost)} had lost their Dask worker(s)")
            if now - self.signal_at > STOP_GRACE_S:
                raise StepAbandoned(f"it did not finish within {STOP_GRACE_S:g} s of the signal")
        if not (lost and not live):
            self.no_worker_since = None
            return
        self.no_worker_since = self.no_worker_since or now
        if now - self.no_worker_since > self.worker_timeout:
            raise StepAbandoned(f"no Dask worker was up to compute its shard(s) {_listed(lost)} for "
                                f"{self.worker_timeout:g} s (backend.worker_timeout: check the workers' logs and "
                                "memory, or raise it where workers take longer to start)")


def _wait_for_first(futures: list, timeout: float):
    """distributed.wait for the first of futures to finish, at most timeout seconds."""
    try:
        wait(futures, timeout=timeout, return_when="FIRST_COMPLETED")
    except TimeoutError as err:
        err.__traceback__ = None  # its frames hold the futures (a cycle): drop them now, not at the next gc


def _fetched(future, timeout: float, shard: int):
    """A done future's result; None when its worker died holding it (the task is pending again).
    StepAbandoned when the scheduler gave the task up (it was running on each of the workers
    that died, distributed.scheduler.allowed-failures + 1 of them)."""
    try:
        return future.result(timeout=timeout)
    except TimeoutError as err:
        err.__traceback__ = None  # as in _wait_for_first
        return None
    except KilledWorker as err:
        raise StepAbandoned(f"shard {shard}'s task was running on every worker that died ({err}); look for "
                            "what kills them (memory: the workers' logs in RUN_DIR/dask-workers)") from None


def _listed(shards) -> str:
    return ", ".join(map(str, sorted(shards)))


class DaskBackend(DriverBackend):
    def __init__(self, config_text: str, data_path: str, workers: int, scheduler: str = "", on_slurm=False,
                 log_dir=None, expect: tuple = ()):
        import dask
        from distributed import Client, LocalCluster

        self.config_text, self.data_path, self.shards = config_text, data_path, workers
        self.expect = expect
        self.worker_timeout = from_toml_text(config_text).backend.worker_timeout
        self.cluster = None
        if scheduler:
            self.client = Client(scheduler)
        elif on_slurm:
            self.cluster = slurm_cluster(config_text, log_dir)
            self.cluster.scale(jobs=workers)
            self.client = Client(self.cluster)
        else:
            with dask.config.set(_UNSET_MALLOC_TRIM):
                self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                            host="127.0.0.1", dashboard_address=None, memory_limit=0)
            self.client = Client(self.cluster)
            self.client.register_plugin(IgnoreCtrlC(), name="ndde-ignore-ctrl-c")
        if on_slurm:  # worker jobs wait in the Slurm queue
            self._wait_for_workers(workers, 600, "are the worker jobs still queued (squeue)?")
        elif scheduler:
            self._wait_for_workers(1, self.worker_timeout, "start workers for it, or raise backend.worker_timeout")
        else:
            self._wait_for_workers(1, self.worker_timeout, "the embedded cluster's worker processes did not "
                                   "start (their errors are above), or raise backend.worker_timeout")

    def _wait_for_workers(self, n: int, timeout: float, hint: str):
        try:
            self.client.wait_for_workers(n, timeout=timeout)
        except TimeoutError:
            address = self.client.scheduler.address
            self.close()
            raise TimeoutError(f"fewer than {n} Dask worker(s) joined the scheduler at {address} within "
                               f"{timeout:g} s: {hint}") from None

    def _placements(self, shards) -> dict:
        """Shard w on the worker named w when it is up (its rows and compiled step are cached
        there), else on one of the workers up (by shard number); None when none is up."""
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        by_name = {str(w["name"]): addr for addr, w in info.items()}
        addrs = sorted(info)
        return {w: by_name.get(str(w)) or (addrs[w % len(addrs)] if addrs else None) for w in shards}

    def _submit(self, flat_theta, step: int, shards, attempt: int) -> tuple[dict, dict]:
        """({shard: future}, {shard: the worker address it was placed on, or None}). The
        placement is loose: the scheduler runs the task elsewhere if that worker dies."""
        placed = self._placements(shards)
        futures = {}
        for w, worker in placed.items():
            where = {"workers": [worker], "allow_other_workers": True} if worker else {}
            futures[w] = self.client.submit(
                _shard_task, self.config_text, self.data_path, w, self.shards, flat_theta, step, self.expect,
                key=f"ndde-shard-{step}-{w}-{attempt}-{id(self)}", pure=False, **where)
        return futures, placed

    def _lost(self, futures: dict, placed: dict) -> tuple[list, list]:
        """(shards that no live worker runs, addresses of the live workers). Such a shard's
        worker died while no other was up: the scheduler holds its task as unrunnable and
        never hands it to a worker that joins later, loose placement or not."""
        try:
            processing = self.client.processing()
        except OSError:  # the scheduler is unreachable, and so is every worker
            processing = {}
        running = {key for keys in processing.values() for key in keys}
        lost = [w for w, f in futures.items() if f.key not in running and placed[w] not in processing]
        return lost, list(processing)

    def step(self, flat_theta, step: int, stopping=None):
        """The reduced step; each shard's result is fetched as soon as it is done (a worker
        that dies later takes nothing with it). stopping: () -> the stop signal's name or None.
        Raises StepAbandoned as _Patience says."""
        stopping = stopping or (lambda: None)
        futures, placed = self._submit(flat_theta, step, range(self.shards), 0)
        results, patience, attempt = {}, _Patience(self.worker_timeout), 0
        while futures:
            _wait_for_first(list(futures.values()), POLL_S)
            for w in [w for w, f in futures.items() if f.done()]:
                result = _fetched(futures[w], FETCH_S, w)
                if result is not None:
                    results[w] = result
                    del futures[w]
            if not futures:
                break
            lost, live = self._lost(futures, placed)
            patience.check(lost, live, stopping())
            if lost and live:
                attempt += 1
                for w in lost:
                    futures.pop(w).release()
                again, where = self._submit(flat_theta, step, lost, attempt)
                futures.update(again)
                placed.update(where)
        return reduce_in_order(list(results.values()))

    def close(self):
        """Each part within CLOSE_TIMEOUT_S; the worker processes of an embedded cluster that
        does not close in time are daemonic and end with this process."""
        for part in (self.client, self.cluster):
            if part is None:
                continue
            try:
                part.close(timeout=CLOSE_TIMEOUT_S)
            except (TimeoutError, OSError) as err:
                print(f"ndde: the Dask {type(part).__name__} did not close within {CLOSE_TIMEOUT_S:g} s "
                      f"({str(err) or type(err).__name__}); its worker processes end with this one",
                      file=sys.stderr, flush=True)
