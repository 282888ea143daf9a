"""One shard per MPI rank (``mpiexec -n N ndde train JOB --backend mpi``): gradients summed
by Allreduce, every rank applies the same update, rank 0 writes files."""

from __future__ import annotations

import numpy as np

from . import Reduced


class MpiBackend:
    def __init__(self, config_text: str, data_path: str, expect: tuple = ()):
        from mpi4py import MPI

        from ..shard import worker_for

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.shards = self.comm.Get_rank(), self.comm.Get_size()
        self.is_root = self.rank == 0
        expect = self.comm.bcast(expect, root=0)  # every rank runs the code the root records
        self.worker = worker_for(config_text, data_path, self.rank, self.shards, expect)

    def step(self, flat_theta, step: int, stopping=None):
        """stopping: unused; every rank finishes the collective step, then they agree to stop."""
        r = self.worker.compute(flat_theta, step)
        grad = np.empty_like(r.grad_sum)
        self.comm.Allreduce(r.grad_sum, grad, op=self.MPI.SUM)
        small = np.array([r.loss_sum, r.steps, r.rejected, r.rhs_evals], np.float64)
        table = np.empty((self.shards, 4), np.float64)
        self.comm.Allgather(small, table)
        errors = [e for e in self.comm.allgather(r.error) if e]
        return Reduced(table[:, 0].copy(), grad, int(table[:, 1].sum()), int(table[:, 2].sum()),
                       int(table[:, 3].sum()), errors)

    def barrier(self):
        self.comm.Barrier()

    def broadcast(self, value):
        return self.comm.bcast(value, root=0)

    def agree(self, value):
        """The first non-None value any rank holds (e.g. a signal only one rank received)."""
        return next((v for v in self.comm.allgather(value) if v is not None), None)

    def close(self):
        pass
