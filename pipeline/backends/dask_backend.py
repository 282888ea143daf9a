"""Shards as Dask tasks: an embedded LocalCluster (worker processes, one thread each,
loopback only) or an existing scheduler. Shard w prefers worker w, which caches its rows
and compiled step; if that worker dies mid-step the scheduler reruns the task elsewhere
(the task is a pure function of theta and the step, so the result is the same)."""

from __future__ import annotations

import os
import signal

from distributed import WorkerPlugin

from . import DriverBackend, reduce_in_order

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
    from ..config import from_toml_text

    if _PINNED:
        return
    _PINNED.append(index)
    if devices.pin(index) is None and from_toml_text(config_text).backend.pin_cpus:
        devices.pin_cpus(index, shards)


def _shard_task(config_text, data_path, shard, shards, flat_theta, step):
    from distributed import get_worker

    from ..shard import worker_for

    name = get_worker().name
    _pin_once(int(name) if str(name).isdigit() else None, shards, config_text)
    kill = os.environ.get("NDDE_TEST_KILL_WORKER", "")  # "STEP:MARKER" fault injection: die once
    if kill and shard == shards - 1:
        kill_step, marker = kill.split(":", 1)
        if int(kill_step) == step and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
    return worker_for(config_text, data_path, shard, shards).compute(flat_theta, step)


def slurm_cluster(config_text: str, log_dir=None):
    """dask-jobqueue's SLURMCluster (not yet scaled): one Slurm job per worker (one process,
    one thread), resources from the job's [slurm] section; the scheduler runs in this process."""
    import sys

    from dask_jobqueue import SLURMCluster

    from ..config import from_toml_text

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


class DaskBackend(DriverBackend):
    def __init__(self, config_text: str, data_path: str, workers: int, scheduler: str = "", on_slurm=False,
                 log_dir=None):
        import dask
        from distributed import Client, LocalCluster

        self.config_text, self.data_path, self.shards = config_text, data_path, workers
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
        self.client.wait_for_workers(workers if on_slurm else 1, timeout=600 if on_slurm else None)

    def _worker_of(self, shard: int):
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        if not info:  # every worker is restarting: wait for one rather than fail the step
            self.client.wait_for_workers(1, timeout=300)
            info = self.client.scheduler_info(n_workers=-1)["workers"]
        by_name = {str(w["name"]): addr for addr, w in info.items()}
        addrs = sorted(info)
        return by_name.get(str(shard)) or (addrs[shard % len(addrs)] if addrs else None)

    def step(self, flat_theta, step: int):
        futures = []
        for w in range(self.shards):
            worker = self._worker_of(w)
            # Prefer shard w's worker (its rows and compiled step are cached there); when the
            # scheduler's view lists no such worker (one restarting), any worker will do.
            where = {"workers": [worker], "allow_other_workers": True} if worker else {}
            futures.append(self.client.submit(
                _shard_task, self.config_text, self.data_path, w, self.shards, flat_theta, step,
                key=f"ndde-shard-{step}-{w}-{id(self)}", pure=False, **where))
        return reduce_in_order(self.client.gather(futures))

    def close(self):
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()
