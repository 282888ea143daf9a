"""All shards in this process, one after another."""

from __future__ import annotations

from ..shard import worker_for
from . import DriverBackend, reduce_in_order


class LocalBackend(DriverBackend):
    def __init__(self, config_text: str, data_path: str, shards: int, expect: tuple = ()):
        self.shards = shards
        self.workers = [worker_for(config_text, data_path, w, shards, expect) for w in range(shards)]

    def step(self, flat_theta, step: int, stopping=None):
        """stopping: unused; a local step runs to its end, then the caller stops."""
        return reduce_in_order([w.compute(flat_theta, step) for w in self.workers])
