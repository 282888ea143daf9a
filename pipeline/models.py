"""A job's model, built from its ``[model] entry`` (``kind`` is a shorthand for a shipped
entry in ``pipeline.zoo``) and its loss (``[loss] entry``, default: masked mean squared
error), as the solver problem each trajectory is solved with.

The problem's parameter pytree is ``{"theta": theta, "sample": sample}``: theta the float
array leaves of the model's params (what is trained and checkpointed), sample one
trajectory's data (``x0``). The model's functions see ``eqx.combine(theta, static)``, the
params as its init returned them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import solvers as sv

from . import entry as entry_mod
from .config import ConfigError, JobConfig
from .model import Model


def make_solver(name):
    return {"tsit5": sv.Tsit5, "dopri5": sv.Dopri5, "bosh3": sv.Bosh3}[name]()


def make_sensitivity(name, checkpoints):
    return {"backprop": lambda: sv.Backprop(checkpoints=checkpoints), "forward": sv.ForwardMode,
            "backsolve": sv.BacksolveAdjoint, "interpolating": lambda: sv.InterpolatingAdjoint(checkpoints),
            "quadrature": sv.QuadratureAdjoint}[name]()


def masked_mse(pred_ys, obs_ys, mask):
    """Mean of (pred - obs)² over the observed entries (``mask`` True); the default loss.
    ``obs_ys`` is 0 where unobserved, so no NaN reaches the gradient.

    Args:
        pred_ys: (n, d) the model's states at the data's times.
        obs_ys: (n, d) the observations, 0 where missing.
        mask: (n, d) True where observed.

    Returns:
        A scalar.
    """
    return jnp.sum(jnp.where(mask, (pred_ys - obs_ys) ** 2, 0.0)) / jnp.sum(mask)


def split_params(tree, dtype, entry: str):
    """(theta, static): the float array leaves of ``tree`` cast to ``dtype`` (None elsewhere),
    and the rest (None where theta has a leaf); ``eqx.combine(theta, static)`` rebuilds ``tree``.

    Args:
        tree: what the model's init returned.
        dtype: the job's float dtype (solver.dtype).
        entry: the model's entry, named in errors.

    Returns:
        (theta, static) pytrees of the same structure as ``tree``.

    Raises:
        ConfigError: a leaf is an array of integers or booleans, a Python number or a string.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        where = f"params{jax.tree_util.keystr(path)}"
        if eqx.is_array(leaf) or isinstance(leaf, np.ndarray):
            if not jnp.issubdtype(leaf.dtype, jnp.floating):
                raise ConfigError(f"{entry}: init(key) returned {where} of dtype {leaf.dtype}; params must be float "
                                  "arrays (keep integer settings in the model's closure)")
        elif isinstance(leaf, (bool, int, float, complex, str, bytes)):
            raise ConfigError(f"{entry}: init(key) returned {where} = {leaf!r} ({type(leaf).__name__}); params "
                              "must be float arrays: wrap it in jnp.asarray(...)")
        elif not callable(leaf):
            raise ConfigError(f"{entry}: init(key) returned {where} of type {type(leaf).__name__}; params must be "
                              "float arrays")
    theta, static = eqx.partition(tree, lambda leaf: eqx.is_array(leaf) or isinstance(leaf, np.ndarray))
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), theta), static


def check_state(model: Model, params, x0, entry: str) -> None:
    """Evaluate rhs (and history) once on one trajectory's x0 and refuse a shape other than x0's.

    Args:
        model: the user's model.
        params: init's params (static leaves included).
        x0: one initial state, shape (d,).
        entry: the model's entry, named in errors.

    Raises:
        ConfigError: rhs, delays or history return a shape that does not fit the data.
    """
    x0 = jnp.asarray(x0)
    t0 = jnp.zeros((), x0.dtype)
    try:
        if model.is_dde:
            # params closed over: their non-array leaves (an MLP's activation) are no abstract values
            taus = jax.eval_shape(lambda: model.delays(params))
            if len(taus.shape) != 1 or taus.shape[0] < 1:
                raise ConfigError(f"{entry}: delays(params) returned shape {taus.shape}; it must be a 1-D array of "
                                  "m >= 1 delays")
            lagged = jnp.zeros((taus.shape[0], *x0.shape), x0.dtype)
            out = jax.eval_shape(lambda: model.rhs(t0, x0, lagged, params))
            what = "rhs(t, x, lagged, params)"
            if model.history is not None:
                hist = jax.eval_shape(lambda: model.history(t0, params, x0))
                if hist.shape != x0.shape:
                    raise ConfigError(f"{entry}: history(t, params, x0) returned shape {hist.shape}; the data's "
                                      f"state has shape {x0.shape}")
        elif isinstance(model.rhs, sv.GradientField):
            model.rhs.check(x0, params)  # J (d, d), H scalar, extra the state's shape: named as such
            out, what = jax.eval_shape(lambda: jax.grad(model.rhs.H)(x0, params)), "GradientField H's gradient"
        else:
            out, what = jax.eval_shape(lambda: model.rhs(t0, x0, params)), "rhs(t, x, params)"
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 (the user's code failed on the data's state: named in one line)
        raise ConfigError(f"{entry}: evaluating the model on a state of shape {x0.shape} (the data's) failed: "
                          f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if out.shape != x0.shape:
        raise ConfigError(f"{entry}: {what} returned shape {out.shape}; the data's state has shape {x0.shape} "
                          "(ys is (N, n, d), x0 is (N, d))")


@dataclasses.dataclass(frozen=True)
class BuiltModel:
    """A job's model ready to train: the user's ``Model``, its params split into what is
    trained (``theta0``) and what is not (``static``), the dtype and the per-trajectory loss.
    Invariant: ``eqx.combine(theta, static)`` has the structure ``model.init`` returns."""

    entry: str
    model: Model
    static: object      # the params' leaves that are not float arrays (None where theta has one)
    theta0: object      # the float array leaves of init(PRNGKey(model.seed)), in dtype
    dtype: object
    loss: Callable      # loss(pred_ys, obs_ys, mask) for one trajectory

    @property
    def init(self):
        """key -> theta: the trained part of ``model.init(key)``, in the job's dtype."""
        return lambda key: split_params(self.model.init(key), self.dtype, self.entry)[0]

    def params(self, theta):
        return eqx.combine(theta, self.static)

    def problem(self, t1):
        """The solver problem of one trajectory up to ``t1`` (t0 = 0)."""
        m, params = self.model, lambda p: self.params(p["theta"])
        if not m.is_dde:
            if isinstance(m.rhs, sv.GradientField):
                rhs = sv.GradientField(lambda x, p: m.rhs.H(x, params(p)), jnp.asarray(m.rhs.J, self.dtype),
                                       None if m.rhs.extra is None else
                                       (lambda t, x, p: m.rhs.extra(t, x, params(p))), m.rhs.adjoint_vjp)
            else:
                rhs = lambda t, x, p: m.rhs(t, x, params(p))
            return sv.ODEProblem(rhs, x0=lambda p: p["sample"]["x0"], t0=0.0, t1=t1)
        if m.history is None:
            history = lambda t, p: p["sample"]["x0"] + 0.0 * t
        else:
            history = lambda t, p: m.history(t, params(p), p["sample"]["x0"])
        return sv.DDEProblem(lambda t, x, lagged, p: m.rhs(t, x, lagged, params(p)), history,
                             lambda p: m.delays(params(p)), 0.0, t1)

    def solve(self, job: JobConfig, theta, sample, ts, sensitivity=None, throw=True):
        """One trajectory's solution at ``ts`` (``sample``: {"x0"}) with the job's solver settings.

        Args:
            job: the job (its [solver] section).
            theta: the trained params.
            sample: {"x0": (d,)}.
            ts: (n,) save times, ts[0] = t0 = 0.
            sensitivity: a solvers sensitivity; None: the job's.
            throw: raise the solver's error (True) or return NaN (False).

        Returns:
            The solvers.Solution.
        """
        s = job.solver
        sens = make_sensitivity(s.sensitivity, s.checkpoints) if sensitivity is None else sensitivity
        return sv.solve(self.problem(ts[-1]), {"theta": theta, "sample": sample}, saveat=ts,
                        solver=make_solver(s.method), rtol=s.rtol, atol=s.atol, sensitivity=sens,
                        max_steps=s.max_steps, history_size=s.history_size or None, throw=throw)

    def tau(self, theta):
        """The first delay (a DDE), or None: the ``tau`` metric."""
        return self.model.delays(self.params(theta))[0] if self.model.is_dde else None

    def check_state(self, x0) -> None:
        check_state(self.model, self.params(self.theta0), x0, self.entry)


def model_options(job: JobConfig) -> dict:
    """The keyword arguments of the model's entry: ``[model.options]``, and for a ``kind``
    shorthand its ``hidden`` (and ``tau_init`` for a DDE kind)."""
    m = job.model
    shorthand = {} if not m.kind else {"hidden": m.hidden} if m.kind == "hnn" else {"hidden": m.hidden,
                                                                                     "tau_init": m.tau_init}
    return {**shorthand, **m.options}


def _returned_model(fn, job) -> Model:
    with jax.enable_x64(job.solver.dtype == "float64"):
        model = entry_mod.call(fn, job.model.entry, model_options(job), "model")
    if not isinstance(model, Model):
        raise ConfigError(f"model.entry {job.model.entry!r} returned {type(model).__name__}, not a pipeline.Model")
    if not callable(model.init) or not callable(model.rhs):
        raise ConfigError(f"model.entry {job.model.entry!r}: the Model's init and rhs must be functions")
    for name in ("delays", "history"):
        if getattr(model, name) is not None and not callable(getattr(model, name)):
            raise ConfigError(f"model.entry {job.model.entry!r}: the Model's {name} must be a function or None")
    if model.history is not None and model.delays is None:
        raise ConfigError(f"model.entry {job.model.entry!r}: the Model has a history but no delays (an ODE needs "
                          "none)")
    return model


def build_model(job: JobConfig, expect: dict | None = None) -> BuiltModel:
    """The job's model, imported from ``model.source`` (else the file ``model.entry`` names,
    beside the job file first). ``expect``: {section: sha256} the entry files must have.

    Raises:
        ConfigError: the entry does not import, does not return a ``pipeline.Model``, does not
            take the options, or its params are not float arrays.
    """
    if job.solver.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if job.solver.dtype == "float64" else jnp.float32
    m, files = job.model, entry_mod.sources(job)
    expect = expect or {}
    model = _returned_model(entry_mod.load(m.entry, files["model"], expect.get("model")), job)
    with jax.enable_x64(job.solver.dtype == "float64"):
        try:
            tree = model.init(jax.random.PRNGKey(m.seed))
        except Exception as err:  # noqa: BLE001 (the user's code: any error, named in one line)
            raise ConfigError(f"model.entry {m.entry!r}: init(key) failed: {type(err).__name__}: "
                              f"{(str(err).splitlines() or [''])[0]}") from None
    theta0, static = split_params(tree, dtype, m.entry)
    loss = masked_mse
    if job.loss.entry:
        loss = entry_mod.load(job.loss.entry, files["loss"], expect.get("loss"))
    return BuiltModel(m.entry, model, static, theta0, dtype, loss)


def init_params(job: JobConfig):
    return build_model(job).theta0
