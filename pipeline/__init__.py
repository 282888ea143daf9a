"""ndde.pipeline: training jobs, data, checkpoints, backends and the `ndde` command.

``pipeline.Model`` is the contract a job's ``[model] entry`` function returns."""

from .model import Model

__all__ = ["Model"]
