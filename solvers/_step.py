"""One explicit RK step: stages, solution, embedded error and dense-output coefficients."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._history import reads_left
from ._tableau import ButcherTableau


class StepResult(NamedTuple):
    y1: jax.Array
    err: jax.Array | None
    k_last: jax.Array  # last stage: f(t1, y1) for FSAL tableaus
    coeffs: jax.Array  # (degree + 1, *shape): y0 then θ^1..θ^deg coefficients
    x_stages: list  # the state part of each stage's input (the first: y's)


def _combine(weights, ks):
    terms = [w * k for w, k in zip(weights, ks) if w != 0.0]
    if not terms:
        return jnp.zeros_like(ks[0])
    out = terms[0]
    for term in terms[1:]:
        out = out + term
    return out


def rk_step(tab: ButcherTableau, f, t, y, h, k1, n_state=None, n_dense=None, lookups=None,
            n_err=None) -> StepResult:
    """Take one step of size h from (t, y) with first stage k1 = f(t, y).

    ``f(t, y, left)`` evaluates the right-hand side at a stage after the first one; ``left`` (a
    Python bool, _history.reads_left of the stage's node) is the side its delayed lookups read at
    a boundary.

    lookups: when set, ``lookups(ts, lefts)`` reads what the stages need of the stored history at
    all stage times ts (shape (stages - 1,)) and sides at once, and f is called as
    ``f(t, y, left, looked)`` with stage i's slice. The lookups depend on the stage times only
    (the step is capped at the smallest delay), and one batched read compiles to one copy of the
    lookup code instead of one per stage.

    n_state: when set (1-D y), only y[:n_state] is a state that f reads; the rest is a pure
    integral of f's output (an adjoint's ∫ f_pᵀλ). f then receives y[:n_state] only, the
    integral is advanced with the weights b alone, and coeffs cover the state only; err covers
    y[:n_err] (all of y when n_err is None), the integrals' quadrature error (weights b_err)
    included: a step whose state is exact (λ constant where f_x = 0) may still integrate them
    badly. y[n_err:] is outside the step control, and its error is not computed.
    n_dense (≥ n_state): coeffs cover y[:n_dense], the state and the integrals right after it
    whose dense output is read (a DDE adjoint's ∫ μ_j, see sensitivity/_adjoint.py).
    """
    dtype = y.dtype
    cast = lambda w: [float(v) for v in w]  # Python floats are weakly typed: dtype follows y
    cut = (lambda k: k) if n_state is None else (lambda k: k[:n_state])
    x = cut(y)
    ks, kx = [k1], [cut(k1)]  # every stage, and its state part
    x_stage, x_stages = x, [x]
    ts = [t + jnp.asarray(c, dtype) * h for c in tab.c[1:]]
    lefts = [reads_left(c) for c in tab.c[1:]]
    if lookups is not None and ts:  # Euler has no later stage
        looked = lookups(jnp.stack(ts), jnp.asarray(lefts))
        stage_f = lambda i, s, z: f(s, z, lefts[i - 1], jax.tree_util.tree_map(lambda a: a[i - 1], looked))
    else:
        stage_f = lambda i, s, z: f(s, z, lefts[i - 1])
    for i, row in enumerate(tab.a, start=1):
        x_stage = x + h * _combine(cast(row), kx)
        x_stages.append(x_stage)
        ks.append(stage_f(i, ts[i - 1], x_stage))
        kx.append(cut(ks[-1]))
    x1 = x_stage if tab.fsal else x + h * _combine(cast(tab.b), kx)
    if n_state is None:
        y1 = x1
    else:
        y1 = jnp.concatenate([x1, y[n_state:] + h * _combine(cast(tab.b), [k[n_state:] for k in ks])])
    err = None
    if tab.adaptive:
        err = h * _combine(cast(tab.b_err), kx)
        if n_state is not None:
            err = jnp.concatenate([err, h * _combine(cast(tab.b_err), [k[n_state:n_err] for k in ks])])
    if n_dense is not None and n_dense != n_state:
        x, kx = y[:n_dense], [k[:n_dense] for k in ks]
    dense = [h * _combine(cast([row[p] for row in tab.dense]), kx) for p in range(tab.degree)]
    return StepResult(y1, err, ks[-1], jnp.stack([x] + dense), x_stages)
