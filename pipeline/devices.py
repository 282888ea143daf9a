"""One GPU per worker or rank: which device a process with a given local rank should see;
without GPUs, a disjoint block of CPU cores per worker or rank.

Pure functions of the environment so the assignment is tested on machines without GPUs;
``pin`` applies it by setting CUDA_VISIBLE_DEVICES before JAX initialises its backend, and
``pin_cpus`` sets the CPU affinity of every thread of the process (XLA's CPU backend
otherwise spreads each process over all cores, and co-located workers contend).
"""

from __future__ import annotations

import os
import pathlib

LOCAL_RANK_VARS = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK")
WORLD_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


def _rank_from(names, env) -> int | None:
    env = os.environ if env is None else env
    for var in names:
        if env.get(var, "").strip().isdigit():
            return int(env[var])
    return None


def local_rank(env=None) -> int | None:
    """The process's rank on its node from the launcher's variables (MPICH, Open MPI, Slurm)."""
    return _rank_from(LOCAL_RANK_VARS, env)


def world_rank(env=None) -> int | None:
    """The process's rank among all ranks from the launcher's variables, before MPI starts."""
    return _rank_from(WORLD_RANK_VARS, env)


def visible_gpus(env=None, proc_root="/proc/driver/nvidia/gpus") -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else the driver's list."""
    env = os.environ if env is None else env
    if "CUDA_VISIBLE_DEVICES" in env:
        return [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() not in ("", "-1")]
    root = pathlib.Path(proc_root)
    return [str(i) for i in range(len(list(root.iterdir())))] if root.is_dir() else []


def gpu_for(rank: int, gpus: list[str]) -> str | None:
    """The one GPU for local rank ``rank`` (round robin when ranks outnumber GPUs); None: CPU."""
    if rank < 0:
        raise ValueError(f"local rank must be >= 0, got {rank}")
    return gpus[rank % len(gpus)] if gpus else None


def pin(rank: int | None, env=None) -> str | None:
    """Restrict this process to its GPU; returns the id, or None when there is no GPU."""
    env = os.environ if env is None else env
    if rank is None:
        return None
    gpu = gpu_for(rank, visible_gpus(env))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return gpu


def cpus_for(rank: int, local_size: int, cpus: list[int]) -> list[int]:
    """Disjoint, contiguous blocks of ``cpus`` for ``local_size`` workers on one node (one
    core each, round robin, when workers outnumber cores)."""
    if not 0 <= rank < local_size:
        raise ValueError(f"local rank {rank} outside [0, {local_size})")
    cpus = sorted(cpus)
    if local_size >= len(cpus):
        return [cpus[rank % len(cpus)]]
    per = len(cpus) // local_size
    return cpus[rank * per:(rank + 1) * per]


def pin_cpus(rank: int | None, local_size: int) -> list[int] | None:
    """Restrict every thread of this process to its block of cores (Linux); None: unchanged."""
    if rank is None or local_size < 2 or not hasattr(os, "sched_setaffinity"):
        return None
    block = cpus_for(rank, local_size, sorted(os.sched_getaffinity(0)))
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), block)
        except OSError:
            pass
    return block
