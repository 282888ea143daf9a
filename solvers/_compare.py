"""compare_sensitivities: every applicable gradient method and central finite differences on
one problem, side by side — the check the user in shared/seed/ was missing."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ._problem import DDEProblem, floats_as_arrays
from ._setup import initial_state
from ._solve import solve
from .sensitivity import (AbstractSensitivity, BacksolveAdjoint, Backprop, ForwardMode, InterpolatingAdjoint,
                          QuadratureAdjoint)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """gradients: name -> flat gradient; seconds: name -> median time of a jitted
    value_and_grad (None for finite differences); difference[a][b]: max |g_a - g_b| / max |g_b|;
    errors: name -> the error of each method that failed (it has no gradient)."""

    gradients: dict
    seconds: dict
    difference: dict
    errors: dict = dataclasses.field(default_factory=dict)

    def worst(self, exclude=()) -> float:
        """The largest relative difference between any two methods not in ``exclude``. A method
        that failed is an error here unless excluded: a comparison without it is not the one asked for."""
        failed = [n for n in self.errors if n not in exclude]
        if failed:
            raise ValueError(f"ndde: {', '.join(failed)} failed ({self.errors[failed[0]]}); pass "
                             f"exclude={tuple(failed)!r} to compare the others")
        names = [n for n in self.gradients if n not in exclude]
        return max(self.difference[a][b] for a in names for b in names if a != b)

    def table(self) -> str:
        """Rows: each method, numbered, with its time; column (j): max relative difference to
        method j (numbers instead of names keep the table within ~90 characters)."""
        names = list(self.gradients)
        labels = [f"({j}) {n}" for j, n in enumerate(names, 1)]
        width = max(len(n) for n in labels) + 2
        head = "method".ljust(width) + "time (s)".rjust(10) + "".join(f"({j})".rjust(9) for j in range(1, len(labels) + 1))
        lines = [head, "-" * len(head)]
        for a, label in zip(names, labels):
            sec = self.seconds[a]
            row = label.ljust(width) + (f"{sec:10.4f}" if sec is not None else "         -")
            row += "".join(("-" if a == b else f"{self.difference[a][b]:.1e}").rjust(9) for b in names)
            lines.append(row)
        lines += [f"{name}: failed: {message}" for name, message in self.errors.items()]
        return "\n".join(lines)


def _methods_for(prob):
    methods = {"Backprop": Backprop(), "ForwardMode": ForwardMode(),
               "InterpolatingAdjoint": InterpolatingAdjoint(), "QuadratureAdjoint": QuadratureAdjoint()}
    if not isinstance(prob, DDEProblem):
        methods["BacksolveAdjoint"] = BacksolveAdjoint()
    return methods


def _named(methods) -> dict:
    named = dict(methods) if isinstance(methods, dict) else {repr(s): s for s in methods}
    for name, sens in named.items():
        if not isinstance(sens, AbstractSensitivity):
            raise TypeError(f"compare_sensitivities: methods[{name!r}] must be a sensitivity such as "
                            f"Backprop() or InterpolatingAdjoint(checkpoints=4), got {sens!r}")
    if not named:
        raise ValueError("compare_sensitivities: methods is empty")
    return named


def compare_sensitivities(prob, p, loss, *, saveat=None, methods=None, fd_step=1e-6, repeats=3,
                          verbose=True, **solve_kwargs) -> Comparison:
    """Gradient of ``loss(sol.ys)`` w.r.t. ``p`` (its floating-point leaves; ints and bools are
    settings, left as they are) by every applicable method and by central finite differences
    (float64), with timings; prints the table unless ``verbose=False``.

    methods: sensitivities (a list, named by repr) or a dict name -> sensitivity (default: every
    method that supports the problem).
    solve_kwargs go to ``solve`` (default tolerances here: rtol=1e-10, atol=1e-12).
    A method that fails (an adjoint's backward sweep out of max_steps, say) is listed under the
    table with its error and kept in ``Comparison.errors``, and the others are compared; when
    every method fails, the first one's error is raised.
    """
    if not jax.config.jax_enable_x64:
        raise ValueError("compare_sensitivities needs float64: call "
                         "jax.config.update('jax_enable_x64', True) first")
    solve_kwargs = {"rtol": 1e-10, "atol": 1e-12, **solve_kwargs}
    methods = _methods_for(prob) if methods is None else _named(methods)
    # the floating-point leaves are the parameters; other leaves (settings) are neither
    # differentiated nor perturbed (raveled with them, an int read back perturbed values)
    params, settings = eqx.partition(floats_as_arrays(p), eqx.is_inexact_array)
    p_flat, unravel = ravel_pytree(params)
    p_flat = p_flat.astype(jnp.float64)
    _check_float64_scalar_loss(prob, eqx.combine(unravel(p_flat), settings), loss, saveat)

    def objective(flat, sensitivity):
        q = eqx.combine(unravel(flat), settings)
        sol = solve(prob, q, saveat=saveat, sensitivity=sensitivity, **solve_kwargs)
        return loss(sol.ys)

    gradients, seconds = {}, {}
    errors = {}
    for name, sens in methods.items():
        fn = jax.jit(jax.value_and_grad(lambda f, s=sens: objective(f, s)))
        try:
            with _quiet_callbacks():
                _, g = jax.block_until_ready(fn(p_flat))
        except Exception as err:  # noqa: BLE001 (reported in the table; re-raised below if all fail)
            errors[name] = err
            continue
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn(p_flat))
            times.append(time.perf_counter() - t)
        gradients[name], seconds[name] = np.asarray(g), statistics.median(times)

    if errors and not gradients:
        raise next(iter(errors.values()))
    errors = {name: _first_line(err) for name, err in errors.items()}
    value = jax.jit(lambda f: objective(f, Backprop()))
    fd = np.zeros(p_flat.shape[0])
    for i in range(p_flat.shape[0]):
        step = fd_step * max(1.0, abs(float(p_flat[i])))
        e = jnp.zeros_like(p_flat).at[i].set(step)
        fd[i] = (float(value(p_flat + e)) - float(value(p_flat - e))) / (2 * step)
    gradients["finite differences"], seconds["finite differences"] = fd, None

    difference = {a: {b: float(np.max(np.abs(ga - gb)) / max(np.max(np.abs(gb)), 1e-300))
                      for b, gb in gradients.items()} for a, ga in gradients.items()}
    result = Comparison(gradients, seconds, difference, errors)
    if verbose:
        print(result.table())
    return result


def _check_float64_scalar_loss(prob, p, loss, saveat):
    """Errors that name the problem: the comparison runs in float64 (p, here cast to it, with a
    float32 state failed in the rhs), and loss(ys) must be a scalar."""
    state = jax.eval_shape(lambda: initial_state(prob, p))
    if state.dtype != jnp.float64:
        raise ValueError(f"compare_sensitivities compares gradients in float64 (finite differences need "
                         f"it), but the problem's state is {state.dtype}: build the problem with a float64 "
                         "x0 (and history) for the check")
    n = 1 if saveat is None else int(np.size(saveat))
    out = jax.eval_shape(loss, jax.ShapeDtypeStruct((n, *state.shape), state.dtype))
    if getattr(out, "shape", None) != ():
        raise ValueError(f"compare_sensitivities: loss(ys) must return a scalar; for ys of shape "
                         f"{(n, *state.shape)} it returned shape {getattr(out, 'shape', type(out).__name__)}")


def _first_line(err) -> str:
    """The line of an error that says what went wrong: ndde's own message when the error carries
    one (inside jax.jit it comes wrapped in JAX's runtime error, after a traceback of the host
    callback), else the first line of the message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "ndde: " in line:
            return line[line.index("ndde: "):]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


@contextlib.contextmanager
def _quiet_callbacks():
    """JAX logs the traceback of a failing host callback (ndde's error checks inside jit) before
    raising; here the error is caught and reported in the table, so the traceback is not shown."""
    log = logging.getLogger("jax._src.callback")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)
