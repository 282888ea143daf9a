"""ndde.pipeline: training jobs, data, checkpoints, backends and the `ndde` command."""
