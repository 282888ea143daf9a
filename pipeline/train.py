"""The training loop: reduce the shards' gradients (any backend), one optax update,
metrics, checkpoints; start fresh or resume exactly from the newest checkpoint that verifies.

Exactness: a step is a pure function of (theta, optimizer state, step number) — the batch
comes from ``default_rng([seed, step, shard])`` — so a resumed run repeats the bits of one
that never stopped (same backend and worker count).
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from . import config as config_mod
from . import early_signals
from . import entry as entry_mod
from .backends import StepAbandoned
from .checkpoint import CheckpointManager, Restored, read_attrs
from .data import digest
from .models import build_model

METRICS = ("loss", "loss_per_shard", "grad_norm", "solver_steps", "rejected", "rhs_evals", "wall_time", "tau",
           "skipped")
# What a resumed run may not change: the batches and the model would differ.
LOCKED_SECTIONS = ("model", "loss", "data")
LOCKED_KEYS = (("train", "seed"), ("train", "batch_size"), ("backend", "workers"))
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed after a signal; the batch script requeues


class RunStopped(RuntimeError):
    """The run stopped; every MPI rank raises it, and ``root`` is True on the one that reports it."""

    def __init__(self, message, root=True):
        super().__init__(message)
        self.root = root


class TrainingError(RunStopped):
    """A step that could not be applied (non-finite loss or gradient, solver failure)."""


class ResumeError(RuntimeError):
    """A run directory whose job no longer matches its checkpoints."""


class Preempted(RunStopped):
    """SIGUSR1/SIGTERM/SIGINT arrived; the current step finished and a checkpoint was written.
    exit_code: EXIT_PREEMPTED, or 130 (the shell's code for Ctrl-C) after SIGINT, which the
    batch script must not read as a request to requeue."""

    def __init__(self, message, root=True, signal_name="SIGTERM"):
        super().__init__(message, root)
        self.exit_code = 128 + signal.SIGINT if signal_name == "SIGINT" else EXIT_PREEMPTED


def preempted_while_starting(signal_name, before, root=True) -> Preempted:
    """The stop of a run that a signal reached before ``before`` (its first step): exit 75 (130
    after SIGINT), nothing checkpointed since nothing was trained."""
    return Preempted(f"{signal_name} received while starting, before {before}: nothing trained, no checkpoint "
                     "written; run the same command again to start it", root=root, signal_name=signal_name)


def slurm_attrs(env=None) -> dict:
    """slurm_job_id and slurm_restart_count when running inside a Slurm job."""
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_ID", "").isdigit():
        return {}
    restarts = env.get("SLURM_RESTART_COUNT", "0")
    return {"slurm_job_id": int(env["SLURM_JOB_ID"]), "slurm_restart_count": int(restarts) if restarts.isdigit() else 0}


def learning_rate_schedule(job) -> optax.Schedule:
    """The learning rate by update count, laid out over the job's train.steps: the warmup's
    steps, then the decay over the rest (cosine reaches 0 and exponential decay_rate times the
    peak at train.steps, as optax's warmup_cosine_decay_schedule counts its decay_steps)."""
    o = job.optimizer
    total = job.train.steps - o.warmup_steps  # join_schedules restarts the count at the boundary
    lr = {"constant": lambda: optax.constant_schedule(o.learning_rate),
          "cosine": lambda: optax.cosine_decay_schedule(o.learning_rate, total),
          "exponential": lambda: optax.exponential_decay(o.learning_rate, total, o.decay_rate)}[o.schedule]()
    if o.warmup_steps:
        lr = optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps), lr],
                                  [o.warmup_steps])
    return lr


def make_optimizer(job) -> optax.GradientTransformation:
    o = job.optimizer
    opt = {"adam": optax.adam, "adamw": optax.adamw, "sgd": optax.sgd}[o.name](learning_rate_schedule(job))
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), opt) if o.clip_norm > 0 else opt


class _Signals:
    """SIGUSR1 (Slurm's warning before preemption or the time limit), SIGTERM and SIGINT (Ctrl-C):
    finish the step, checkpoint, exit. A second SIGINT stops at once (KeyboardInterrupt)."""

    def __init__(self, announce=True):
        self.received = None
        self._old = {}
        self._announce = announce

    def __enter__(self):
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.received == "SIGINT":
                raise KeyboardInterrupt
            if self._announce:
                print("\nndde: Ctrl-C: finishing this step to checkpoint it (Ctrl-C again stops at once, "
                      "losing the steps since the newest checkpoint)", file=sys.stderr, flush=True)
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def check_resumable(job, attrs: dict, path, data_path, data_sha256, code: dict, allow_model_change=False) -> None:
    """Refuse (ResumeError, listing every difference) when the job's model, data, batch
    drawing, the data file's contents or (unless ``allow_model_change``) the model's or loss'
    code (``code``: entry.digests of the job) differ from the checkpoint at ``path``."""
    try:
        old = config_mod.from_toml_text(attrs["config"])
    except config_mod.ConfigError as err:
        raise ResumeError(f"refusing to resume from {path}: the job it records is not a valid job ({err})") from None
    diffs = config_mod.differences(old, job, LOCKED_SECTIONS)
    diffs += [f"{s}.{k}: {getattr(getattr(old, s), k)!r} -> {getattr(getattr(job, s), k)!r}"
              for s, k in LOCKED_KEYS if getattr(getattr(old, s), k) != getattr(getattr(job, s), k)]
    if attrs.get("data_sha256") not in (None, data_sha256):
        diffs.append(f"the contents of {data_path} changed since {pathlib.Path(path).name}")
    for section in ("model", "loss"):
        recorded, now = attrs.get(f"{section}_sha256"), code.get(f"{section}_sha256")
        if recorded is not None and recorded != now and not allow_model_change:
            diffs.append(f"the {section} code {code.get(f'{section}_file', attrs.get(f'{section}_file'))} changed "
                         f"since {pathlib.Path(path).name} (sha256 {str(recorded)[:12]}... -> {str(now)[:12]}...; "
                         "--allow-model-change resumes with the new code)")
    if diffs:
        raise ResumeError(f"refusing to resume from {path}: the job differs from the checkpoint's "
                          "(" + "; ".join(diffs) + "). Start a new run directory with `ndde train` instead.")


class Trainer:
    def __init__(self, job, run_dir, backend, data_path, extra_attrs=None, allow_model_change=False):
        self.job, self.backend = job, backend
        self.run_dir = pathlib.Path(run_dir)
        self.model = build_model(job)
        self.theta0 = self.model.theta0
        self.allow_model_change = allow_model_change
        self.code = entry_mod.digests(job)
        self.opt = make_optimizer(job)
        self.manager = CheckpointManager(self.run_dir / "checkpoints", job.checkpoint.keep)
        self.config_text = job.to_toml()
        self.attrs = {"shards": backend.shards, "backend": job.backend.kind,
                      "data_sha256": digest(data_path), **self.code, **slurm_attrs(), **(extra_attrs or {})}
        self.data_path = data_path
        _, self.unravel = ravel_pytree(self.theta0)
        self._update = jax.jit(self._update_fn)

    def _update_fn(self, theta, opt_state, grad):
        updates, opt_state = self.opt.update(grad, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state

    def restore_latest(self) -> Restored | None:
        step = self.backend.broadcast(self.manager.latest_valid_step() if self.backend.is_root else None)
        if step is None:
            return None
        path = self.manager.path(step)
        check_resumable(self.job, read_attrs(path), path, self.data_path, self.attrs["data_sha256"], self.code,
                        self.allow_model_change)
        return self.manager.restore(step, self.theta0, self.opt.init(self.theta0))

    def _save(self, step, theta, opt_state, metrics):
        if self.backend.is_root:
            rng = np.array([self.job.train.seed, step], np.uint64)
            return self.manager.save(step, theta, opt_state, rng, {k: np.asarray(v) for k, v in metrics.items()},
                                     self.config_text, self.attrs)
        return None

    def _abandoned(self, err, step, theta, opt_state, metrics, saved, restored, signal_name) -> Preempted:
        """What stops a run whose backend gave up step ``step`` (StepAbandoned): theta,
        opt_state and metrics are those after step - 1, which is checkpointed here unless it
        is the step this process resumed from or saved already. Exit 75 (130 after Ctrl-C)."""
        last = step - 1
        if restored is not None and restored.step == last:
            path = restored.path
        elif last > 0 and saved != self.manager.path(last):
            path = self._save(last, theta, opt_state, metrics)
        else:
            path = saved
        done = f"checkpointed step {last} to {path}" if path else "no step had finished: nothing to checkpoint"
        why = f"{signal_name} received: " if signal_name else ""
        return Preempted(f"{why}step {step} abandoned, {err}; {done}; resume with `ndde resume {self.run_dir}`",
                         signal_name=signal_name or "SIGTERM")

    def run(self, total_steps: int, restored: Restored | None = None, progress: bool = True) -> dict:
        job, B = self.job, self.job.train.batch_size
        if restored is None:
            theta, opt_state, start = self.theta0, self.opt.init(self.theta0), 0
            metrics = {k: [] for k in METRICS}
        else:
            theta = jax.tree_util.tree_map(jnp.asarray, restored.params)
            opt_state = jax.tree_util.tree_map(jnp.asarray, restored.opt_state)
            start = restored.step
            metrics = {k: list(restored.metrics.get(k, []))[:start] for k in METRICS}
            if total_steps < start:
                raise ResumeError(f"{self.run_dir} is at step {start} already ({restored.path.name}); a run cannot "
                                  f"go back to step {total_steps}: give --steps above {start} to continue it")
        if total_steps > job.train.steps and float(learning_rate_schedule(job)(job.train.steps)) == 0.0:
            raise ResumeError(f"steps past train.steps = {job.train.steps} would not change the parameters: the "
                              f"{job.optimizer.schedule} schedule's learning rate is 0 after step {job.train.steps}. "
                              "To train longer, start a new run (`ndde train`) with a larger train.steps")
        bar = _progress(job.name, start, total_steps, progress and self.backend.is_root)
        t_begin, done, saved, skipped = time.perf_counter(), 0, None, 0
        in_a_row = _trailing_run(metrics["skipped"])  # failed steps in a row carry over a resume
        with _Signals(announce=self.backend.is_root) as signals:
            # from here the loop's handlers hold every signal; those before are early_signals'
            early = self.backend.agree(early_signals.received() or signals.received)
            if early:
                bar.close()
                raise preempted_while_starting(early, f"its first step ({start + 1})", self.backend.is_root)
            for step in range(start + 1, total_steps + 1):
                t = time.perf_counter()
                try:
                    red = self.backend.step(np.asarray(ravel_pytree(theta)[0]), step,
                                            stopping=lambda: signals.received)
                except StepAbandoned as err:
                    bar.close()
                    raise self._abandoned(err, step, theta, opt_state, metrics, saved, restored,
                                          signals.received) from None
                loss, grad = float(red.loss_per_shard.sum() / B), red.grad_sum / B
                good = not red.errors and np.isfinite(loss) and bool(np.all(np.isfinite(grad)))
                if good:
                    theta, opt_state = self._update(theta, opt_state, self.unravel(jnp.asarray(grad)))
                    in_a_row = 0
                else:
                    tau = self.model.tau(theta)
                    at = f" at tau = {float(tau):.6g}" if tau is not None else ""
                    why = (red.errors[0].rstrip(".") if red.errors else
                           f"non-finite loss ({loss})" if not np.isfinite(loss) else
                           f"non-finite gradient ({int(np.sum(~np.isfinite(grad)))} of {grad.size} entries)")
                    skipped, in_a_row = skipped + 1, in_a_row + 1
                    limit = job.train.max_skips_in_a_row
                    if job.train.on_nonfinite == "stop" or in_a_row >= limit:
                        newest = self.manager.latest_step()
                        bar.close()
                        if job.train.on_nonfinite == "stop":
                            what = f"step {step} failed{at}: {why}"
                            hint = ' (Set train.on_nonfinite = "skip" to skip such steps.)'
                        else:
                            what = (f"steps {step - in_a_row + 1}..{step} failed in a row "
                                    f"(train.max_skips_in_a_row = {limit}), the last{at}: {why}")
                            hint = ""
                        raise TrainingError(
                            f"{what}. The update was not applied; the newest checkpoint "
                            f"{'is step ' + str(newest) if newest is not None else 'does not exist yet'} "
                            f"in {self.manager.directory}.{hint}", root=self.backend.is_root)
                    if self.backend.is_root:
                        bar.clear()
                        print(f"ndde: step {step} skipped, its update not applied: {why}", file=sys.stderr, flush=True)
                tau = self.model.tau(theta)
                for key, value in (("loss", loss), ("loss_per_shard", red.loss_per_shard),
                                   ("grad_norm", float(np.linalg.norm(grad))), ("solver_steps", red.steps),
                                   ("rejected", red.rejected), ("rhs_evals", red.rhs_evals),
                                   ("wall_time", time.perf_counter() - t),
                                   ("tau", float(tau) if tau is not None else np.nan), ("skipped", not good)):
                    metrics[key].append(value)
                done += 1
                stop = self.backend.agree(signals.received)
                if step % job.checkpoint.every == 0 or step == total_steps or stop:
                    saved = self._save(step, theta, opt_state, metrics) or saved
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3e}")
                if stop:
                    bar.close()
                    where = f" to {saved}" if self.backend.is_root else ""
                    raise Preempted(f"{stop} received: checkpointed step {step}{where}; resume with "
                                    f"`ndde resume {self.run_dir}`", root=self.backend.is_root, signal_name=stop)
        bar.close()
        elapsed = time.perf_counter() - t_begin
        newest = saved or (restored.path if restored else None)
        return {"step": total_steps, "loss": _finite_or_none(metrics["loss"][-1] if metrics["loss"] else None),
                "steps_run": done, "steps_skipped": skipped, "steps_per_s": done / elapsed if elapsed > 0 else None,
                "checkpoint": str(newest) if newest else None,
                "tau": metrics["tau"][-1] if metrics["tau"] and np.isfinite(metrics["tau"][-1]) else None}


def _trailing_run(flags) -> int:
    """How many of the last entries of ``flags`` are true in a row."""
    count = 0
    for flag in reversed(list(flags)):
        if not flag:
            break
        count += 1
    return count


def _finite_or_none(value):
    """A JSON-safe number: None for NaN or inf (json.dumps would write the non-JSON token NaN)."""
    return float(value) if value is not None and np.isfinite(value) else None


def _progress(name, start, total, enabled):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=name, unit="step", disable=not (enabled and sys.stderr.isatty()))
