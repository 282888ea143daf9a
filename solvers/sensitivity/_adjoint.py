"""The continuous adjoints (DESIGN.md, "The mathematics"), for ODEs and DDEs.

The backward sweep runs in reversed time s = -t through the same loop as the forward
solve. For a DDE the adjoint is an advanced equation,
    λ'(t) = -f_x(t)ᵀλ(t) - Σ_j μ_j(t + τ_j),   μ_j(u) = f_{y_j}(u)ᵀλ(u) (0 for u > T),
which in s is an ordinary *retarded* DDE. The sweep integrates M_j(s) = ∫ μ_j(-σ) dσ
alongside λ (μ_j(t) comes out of the same VJP as f_xᵀλ) and keeps M_j's dense output in a
ring buffer: the advanced term μ_j(t + τ_j) is the slope of that output at s - τ_j (zero
before s = -T). One VJP per stage, where reading λ(t + τ_j) instead would need a second VJP
of f at t + τ_j; the slope of an order-4 dense output is accurate to O(h⁴), so the delayed
term's local error is one order lower than with λ's own dense output (measured on the
neural DDE at rtol 1e-10: gradient error 6.6e-10 instead of 4.4e-12; unchanged at 1e-6).
Its breakpoints are every observation time and T shifted by Σ n_j τ_j, plus the forward
ones. Observations add ∂ℓ_k/∂x to λ as impulses.

Every gradient term except one comes from a single vector–Jacobian product of
    p ↦ f(t, x(t), [x(t - τ_j(p)) from the stored dense output or history(·, p)], p)
with x(t) and the stored output held fixed: it yields f_pᵀλ, the history term φ_pᵀμ_j and
the delay term -μ_jᵀ x'(t - τ_j) at once. The remaining one is the discontinuity term
λ(t0+τ_j)ᵀ[f(y_j = φ(t0⁻)) - f(y_j = x0)], computed from λ probed at t0 + τ_j.

InterpolatingAdjoint and BacksolveAdjoint integrate ∫ f_pᵀλ as part of the backward state;
QuadratureAdjoint integrates λ alone and accumulates it by Gauss–Legendre quadrature. Under
jax.vmap every trajectory carries its own n_p-vector ∫ f_pᵀλ, and touching it at every stage
cost 4-8x the batched system (256 trajectories, 4417 parameters): there the sweep records each
step's stage points (Gauss–Legendre nodes for QuadratureAdjoint) with their weights and folds
them in once per chunk of steps by one VJP (the same sum, another order).

The sweep's step control norms λ and ∫μ_j apart, each within rtol/atol: ∫μ_j's slope is the
advanced term of later steps, and where f_x and the advanced term vanish λ is constant and
bounds no step, so an error that the integrals alone carry must bound it. ∫ f_pᵀλ itself stays
outside the control (Rhs.uncontrolled_from): under vmap it is never formed per stage. Its
projection ∫ λᵀ f_p v on the fixed direction v of _directional is in the state and in the
control instead (vᵀ of the VJP's f_pᵀλ, or one JVP along v under vmap), so that a step whose λ
is exact still resolves the parameter integral, and the vmapped and looped sweeps control the same
quantity (to rounding) and take the same steps.
"""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .. import _directional, _forward, _history
from . import _closure, _interpolating
from .._breakpoints import breakpoint_times, stop_times
from .._controller import ConstantStepSize
from .._precision import HIGHEST
from .._problem import DDEProblem, GradientField
from .._setup import build, delays_of, initial_state, lagged_values, solve_delays, unified_rhs
from ._objects import BacksolveAdjoint, InterpolatingAdjoint, QuadratureAdjoint


def adjoint_solve(prob, p, saveat, opts, sens):
    from .._solve import check_loss_cotangent, check_status, stats_of

    is_dde = isinstance(prob, DDEProblem)
    arrays, static = _closure.split(prob, p)  # the problem's own arrays travel as explicit inputs
    dtypes = _closure.dtypes_of((p, saveat, arrays))
    interpolating = isinstance(sens, InterpolatingAdjoint)

    def forward(prob, p, saveat):
        keep_all = isinstance(sens, QuadratureAdjoint)
        built = build(prob, p, saveat, opts, keep_all=keep_all, ring=interpolating)
        cfg = opts.loop_config()
        probe_times, probe_fn, probe_shape = None, None, None
        if is_dde:  # x and the delayed values at each t0 + τ_j, for the discontinuity terms
            probe_times = built.t0 + built.taus
            probe_fn = lambda hist, t, y: jnp.concatenate(
                [y.ravel(), lagged_values(prob, p, built.taus, built.t0, hist, t, True, y).ravel()])
            probe_shape = (built.taus.shape[0], built.y0.size * (1 + built.taus.shape[0]))
        state = _forward.init_state(cfg, built.rhs, built.y0, built.t0, built.t1, saveat, built.rtol,
                                    built.atol, opts.dt0, built.hist0, probe_shape=probe_shape)
        run = lambda st, t_end: _forward.run(cfg, built.rhs, st, t_end, saveat, built.stops, built.stop_is_bp,
                                             built.rtol, built.atol, opts.dt0, probe_times=probe_times,
                                             probe_fn=probe_fn)
        checkpoint_times = None
        if not interpolating:
            final = run(state, built.t1)
            residual = final.hist if keep_all else final.y
        else:
            targets = _interpolating.checkpoint_targets(prob, p, saveat, opts, sens)
            final, residual, checkpoint_times = _interpolating.checkpointed_forward(
                run, state, targets, built.rhs.max_delay, opts, is_dde)
        ys = check_status(final.ys, final.status, opts)
        return (ys, stats_of(final)), (residual, final.probes, checkpoint_times, final.status)

    @jax.custom_vjp
    def solve_adj(p, saveat, arrays):  # not differentiated: the plain forward solve, no checkpoint stops
        from .._solve import forward_solve

        final, _ = forward_solve(eqx.combine(arrays, static), p, saveat, opts)
        return check_status(final.ys, final.status, opts), stats_of(final)

    def backward_problem(p, diff, const):
        """The problem and parameters the reverse pass differentiates: with the problem's
        differentiated arrays lifted into the parameters, (p, diff), when there are any."""
        if _closure.has_diff(diff):
            return _closure.lifted(diff, const, static), (p, diff)
        return _closure.rebuild(diff, const, static), p

    def fwd(p, saveat, arrays):
        wrt_saveat = _closure.saveat_perturbed(saveat, prob)
        p, saveat = _closure.values(p), _closure.values(saveat)
        diff, const = _closure.by_perturbation(arrays, static)
        # the backward pass is itself being differentiated (jax.jvp, jax.linearize): see _discrete_reverse
        if is_dde and opts.grad_differentiated:
            out, pullback = _discrete_reverse(*backward_problem(p, diff, const), saveat, opts)
            return out, (p, saveat, diff, const, (None, pullback), None)
        out, residual = forward(_closure.rebuild(diff, const, static), p, saveat)
        return out, (p, saveat, diff, const, (residual, None), out[0] if wrt_saveat else None)

    def sweep(p, saveat, diff, const, ct_ys, sweep_residual):
        residual, fwd_probes, checkpoint_times, status = sweep_residual
        return _backward(*backward_problem(p, diff, const), saveat, ct_ys, residual, fwd_probes, opts, sens,
                         is_dde, checkpoint_times, status)

    if is_dde:  # see _discrete_reverse: a DDE sweep differentiated where the forward rule did not
        # see it coming (a jax.jvp or jax.hessian applied to a jitted gradient) is replaced by
        # Backprop's reverse pass, which JAX differentiates
        sweep = jax.custom_jvp(sweep)

        @sweep.defjvp
        def _sweep_jvp(primals, tangents):
            p, saveat, diff, const, ct_ys, _ = primals
            dp, dsaveat, ddiff, _, dct, _ = tangents
            discrete = lambda p, saveat, diff, ct: _discrete_reverse(
                *backward_problem(p, diff, const), saveat, opts)[1](ct)[0]
            return jax.jvp(discrete, (p, saveat, diff, ct_ys), (dp, dsaveat, ddiff, dct))

    def bwd(res, ct):
        p, saveat, diff, const, (sweep_residual, pullback), ys = res
        ct_ys = _closure.instantiate(ct[0])
        status = sweep_residual[-1] if sweep_residual is not None else _forward.OK
        ct_ys = check_loss_cotangent(ct_ys, status, opts.on_error)
        if pullback is not None:
            grad = pullback(ct_ys)[0]
        else:
            grad = sweep(p, saveat, diff, const, ct_ys, sweep_residual)
        grad_p, grad_diff = grad if _closure.has_diff(diff) else (grad, diff)
        ct_saveat = _closure.saveat_cotangent(_closure.rebuild(diff, const, static), p, saveat, ys, ct_ys)
        return _closure.cotangents(grad_p, ct_saveat, grad_diff, const, dtypes)

    solve_adj.defvjp(fwd, bwd, symbolic_zeros=True)
    return solve_adj(p, saveat, arrays)


def _backward(prob, p, saveat, ct_ys, residual, fwd_probes, opts, sens, is_dde, checkpoint_times, fwd_status):
    from .._solve import check_gradient

    y0 = initial_state(prob, p)
    dtype, shape, n = y0.dtype, y0.shape, y0.size
    p_flat, unravel = ravel_pytree(p)
    n_p = p_flat.size
    f = unified_rhs(prob)
    t0, T = jnp.asarray(prob.t0, dtype), jnp.asarray(prob.t1, dtype)
    taus, shift = solve_delays(prob, p, dtype, opts, opts.on_error) if is_dde else (None, None)
    backsolve = isinstance(sens, BacksolveAdjoint)
    quadrature = isinstance(sens, QuadratureAdjoint)
    # under vmap every trajectory carries its own ∫ f_pᵀλ: integrated at every stage it is read
    # and written n_p values per trajectory per stage, so there it is folded in per chunk of steps
    deferred = _under_vmap(ct_ys, residual)
    augmented = not quadrature and not deferred
    ct_ys = jnp.asarray(ct_ys, dtype)

    # layout of the backward state Z: [λ, x (backsolve only), ∫μ_j (DDE only), ∫ λᵀ f_p v, ∫ f_pᵀλ
    # (augmented only)], v the step control's fixed direction in p (see _directional)
    m = taus.shape[0] if is_dde else 0
    n_lam = n * (2 if backsolve else 1)  # the part the sweep's rhs reads
    n_mu = m * n
    v = _directional.direction(n_p, dtype)

    def split(Z):
        lam = Z[:n].reshape(shape)
        x = Z[n:2 * n].reshape(shape) if backsolve else None
        return lam, x

    field = getattr(prob, "rhs", None)
    fwd_over_rev = (isinstance(field, GradientField) and not is_dde
                    and field.adjoint_vjp == "forward-over-reverse")

    def vjp_terms(t, x, lam, fwd, left):
        """(f_xᵀλ, μ_j = f_{y_j}ᵀλ for every j (DDE only), ∂/∂p f(t, x, lags(t; p), p)ᵀλ, f) at one time
        (the third None when the parameter part is taken separately: ``deferred``)."""
        if deferred and not is_dde:
            fx, vjp = jax.vjp(lambda x: f(t, x, None, p), x)
            return vjp(lam)[0], None, None, fx
        if deferred:
            fx, vjp = jax.vjp(lambda x, lg: f(t, x, lg, p), x, fwd.lags(t, left, p))
            dx, mu = vjp(lam)
            return dx, mu, None, fx
        if fwd_over_rev:
            fx, dx, dp = field.vjp_with(t, x, p, lam)
            return dx, None, ravel_pytree(dp)[0], fx
        if not is_dde:
            fx, vjp = jax.vjp(lambda x, pf: f(t, x, None, unravel(pf)), x, p_flat)
            dx, dp = vjp(lam)
            return dx, None, dp, fx
        lags, lags_vjp = jax.vjp(lambda pf: fwd.lags(t, left, unravel(pf)), p_flat)
        fx, vjp = jax.vjp(lambda x, lg, pf: f(t, x, lg, unravel(pf)), x, lags, p_flat)
        dx, mu, dp = vjp(lam)
        return dx, mu, dp + lags_vjp(mu)[0], fx

    # f_pᵀλ comes out of the VJP rounded to each parameter's dtype; a JVP's tangent keeps the state's
    dp_exact = all(jnp.finfo(leaf.dtype).bits >= jnp.finfo(dtype).bits
                   for leaf in jax.tree_util.tree_leaves(p) if jnp.issubdtype(leaf.dtype, jnp.inexact))

    def along_v(t, x, lam, fwd, left, dp):
        """λᵀ (f_p v): vᵀ of the VJP's f_pᵀλ where it is taken in the state's precision, else one
        JVP along v (float32 rounding noise in a float64 sweep's control would shrink its steps
        to resolve the noise)."""
        if dp is not None and dp_exact:
            return jnp.dot(v, dp, precision=HIGHEST)[None]
        lags = (lambda q: fwd.lags(t, left, q)) if is_dde else (lambda q: None)
        at = lambda pf: f(t, x, lags(unravel(pf)), unravel(pf))
        _, f_p_v = jax.jvp(at, (p_flat,), (v.astype(p_flat.dtype),))
        return jnp.sum(lam * f_p_v)[None]

    def advanced(hist_b, s, left):
        """Σ_j μ_j(t + τ_j): the slope of the sweep's own ∫μ_j at s - τ_j (DESIGN.md's advanced
        term without a second VJP; zero beyond T, i.e. before s = -T)."""
        total = jnp.zeros(shape, dtype)
        for j in range(m):
            q = s - taus[j]
            slope = _history.lookup_derivative(hist_b, q, left)[j * n:(j + 1) * n].reshape(shape)
            before = ~_history.before(s_start, q, left, _history.side_tolerance(q, s))  # q <= s_start (left)
            total = total + jnp.where(before, 0.0, slope)
        return total

    s_start, s_end = -T, -t0

    if quadrature:  # nodes and weights on [0, 1]; Python floats
        nodes, weights = np.polynomial.legendre.leggauss(sens.nodes)
        gauss = (((nodes + 1) / 2).tolist(), (weights / 2).tolist())

    def make_rhs(fwd):
        def evaluate(hist_b, s, Z, left):
            t = -s
            lam, x_state = split(Z)
            fwd_left = not left  # reversed time: the interior of a backward step lies on the other side
            x = x_state if backsolve else fwd.x(t, fwd_left, p)
            dx, mu, dp, fx = vjp_terms(t, x, lam, None if backsolve else fwd, fwd_left)
            parts = [(dx + advanced(hist_b, s, left)).ravel() if is_dde else dx.ravel()]
            if backsolve:
                parts.append(-fx.ravel())
            if is_dde:
                parts.append(mu.ravel())
            parts.append(along_v(t, x, lam, None if backsolve else fwd, fwd_left, dp))
            if augmented:
                parts.append(dp)
            return jnp.concatenate(parts)

        def param_part(s, Z, left, w):
            """Σ_r w_r ∂/∂p f(t_r, x(t_r), lags(t_r; p), p)ᵀλ_r over a chunk's records: one VJP
            of the records' evaluations, reduced over the records inside it (DESIGN.md's f_pᵀλ
            integrated with the RK weights b, as the augmented state would)."""
            def at_records(pf):
                def one(s, z, left):
                    t, fwd_left = -s, ~left
                    lam, x_state = split(z)
                    x = x_state if backsolve else fwd.x(t, fwd_left, p)
                    q = unravel(pf)
                    return f(t, x, fwd.lags(t, fwd_left, q) if is_dde else None, q)
                return jax.vmap(one)(s, Z, left)

            lam = jax.vmap(lambda z: split(z)[0])(Z)
            return jax.vjp(at_records, p_flat)[1](w.reshape((-1,) + (1,) * len(shape)) * lam)[0]

        def quad(s_a, s_b, coeffs):
            """∫ f_pᵀλ over one backward step by Gauss–Legendre on its dense output, the nodes
            batched: one VJP in the compiled sweep, not one per node."""
            theta, w = (jnp.asarray(v, s_a.dtype) for v in gauss)
            fwd_left = jnp.asarray([not _history.reads_left(th) for th in gauss[0]])  # reversed time, as in evaluate

            def at_node(th, fwd_left):
                s = s_a + th * (s_b - s_a)
                lam = _history.horner(coeffs, th)[:n].reshape(shape)
                return vjp_terms(-s, fwd.x(-s, fwd_left, p), lam, fwd, fwd_left)[2]

            return jnp.sum((w * (s_b - s_a))[:, None] * jax.vmap(at_node)(theta, fwd_left), axis=0)

        cap = jax.lax.stop_gradient(jnp.min(taus)) if is_dde else jnp.asarray(jnp.inf, dtype)
        max_delay = jax.lax.stop_gradient(jnp.max(taus)) if is_dde else jnp.zeros((), dtype)
        # ∫μ_j, ∫ λᵀ f_p v and ∫ f_pᵀλ never feed back into the stages: advanced with the weights b
        # (a vmapped sweep carries one copy per trajectory); ∫μ_j keeps its dense output, whose
        # slope gives the advanced term. ∫μ_j and ∫ λᵀ f_p v are each normed apart from λ in the
        # step control: a step that resolves λ need not resolve them (λ is constant where f_x and
        # the advanced term vanish). ∫ f_pᵀλ itself is left out, so that the per-chunk fold under
        # vmap (which never forms it per stage) takes the same steps.
        return _forward.Rhs(eval=evaluate, cap=cap, max_delay=max_delay,
                            hist_part=(n_lam, n_lam + n_mu) if is_dde else None,
                            quadrature=quad if quadrature and not deferred else None,
                            n_state=n_lam, err_groups=(n_lam, n_lam + n_mu, n_lam + n_mu + 1),
                            uncontrolled_from=n_lam + n_mu + 1,
                            param_part=param_part if deferred else None,
                            param_nodes=gauss if quadrature else None)

    # backward save times (observations, reversed) and their impulses
    s_obs = -saveat[::-1]
    g = ct_ys[::-1].reshape(saveat.shape[0], n)
    at_T = s_obs == s_start
    size_z = n_lam + n_mu + 1 + (n_p if augmented else 0)
    impulses = jnp.zeros((saveat.shape[0], size_z), dtype).at[:, :n].set(jnp.where(at_T[:, None], 0.0, g))
    Z0 = jnp.zeros((size_z,), dtype).at[:n].set(jnp.sum(jnp.where(at_T[:, None], g, 0.0), axis=0))
    if backsolve:
        Z0 = Z0.at[n:2 * n].set(residual.ravel())

    # backward stops: observations and T propagated by Σ nτ, forward breakpoints, segment ends
    level = opts.tableau.order + 1
    bps = None
    if is_dde:
        origins = jnp.concatenate([s_start[None], s_obs])
        forward_bps = -breakpoint_times(t0, taus, level)
        bps = jnp.concatenate([breakpoint_times(origins, taus, level), forward_bps])
    extra = s_obs
    if checkpoint_times is not None:  # the sweep ends a segment where one is re-solved, nowhere else
        # (a checkpoint is a forward step's end: a stop there would cost the sweep a step of its own)
        k = jnp.arange(1, checkpoint_times.shape[0] - 1)
        _, _, ring = residual
        first_held = _interpolating.first_held_segment(ring, checkpoint_times, taus, t0)
        extra = jnp.concatenate([s_obs, jnp.where(k <= first_held, -checkpoint_times[1:-1], jnp.inf)])
    stops, stop_is_bp = stop_times(s_start, s_end, extra, bps)
    probe_times = -(t0 + taus) if is_dde else None

    cfg = _forward.LoopConfig(opts.tableau, opts.controller, opts.max_steps, opts.history_size, True)
    rtol, atol = jnp.asarray(opts.rtol, dtype), jnp.asarray(opts.atol, dtype)
    sweep_capacity = opts.sweep_history_size or opts.history_size
    hist_b = _history.empty(sweep_capacity, opts.tableau.degree, Z0[n_lam:n_lam + n_mu]) if is_dde else None
    acc0 = jnp.zeros((n_p,), dtype) if quadrature or deferred else None
    probe_shape = (taus.shape[0], size_z) if is_dde else None

    # a fixed-step method sweeps back with the forward's dt0 (the sweep took Hairer's starting-step
    # estimate as its constant step: RK4's gradient error did not follow dt, Euler's ran out of steps)
    dt0 = opts.dt0 if isinstance(opts.controller, ConstantStepSize) else None

    def start(fwd):
        return _forward.init_state(cfg, make_rhs(fwd), Z0, s_start, s_end, s_obs, rtol, atol, dt0, hist_b,
                                   acc0, probe_shape=probe_shape)

    def sweep(state, fwd, s_to):
        return _forward.run(cfg, make_rhs(fwd), state, s_to, s_obs, stops, stop_is_bp, rtol, atol, dt0,
                            impulses=impulses, probe_times=probe_times)

    if checkpoint_times is None:
        fwd = None if backsolve else _interpolating.ForwardSolution(prob, t0, residual, y0, shift)
        final = sweep(start(fwd), fwd, s_end)
    else:
        final = _interpolating.sweep_segments(prob, p, saveat, opts, residual, checkpoint_times, first_held, start,
                                              sweep, y0, taus, shift)
    Z = final.y
    lam0 = Z[:n].reshape(shape)
    grad = Z[size_z - n_p:] if augmented else final.acc
    grad = grad + ravel_pytree(jax.vjp(lambda q: initial_state(prob, q), p)[1](lam0)[0])[0]
    if is_dde:
        grad = grad + _jump_terms(prob, p, final.probes[:, :n], fwd_probes, taus, t0, y0, f)
    status = jnp.where(fwd_status != _forward.OK, fwd_status, final.status)  # the forward's failure first
    return unravel(check_gradient(grad, status, opts))


def _discrete_reverse(prob, p, saveat, opts):
    """A DDE adjoint whose gradient is itself differentiated (jax.jvp, jax.linearize): the forward
    solve of Backprop and its pullback, ((ys, stats), pullback). Differentiating the continuous
    sweep in τ would need it to land separately on stops that coincide at this τ but move apart
    with it (an observation and a backward breakpoint T - τ, or two breakpoints of different
    origins: common with commensurate delays and observation grids); one landing for both
    misses that motion (measured on A_cont: a Hessian-vector product off by 0.05-0.3, every
    component). The discrete solve's stops are the forward breakpoints only, each landed on
    alone. Taken by the forward rule when the tracers show the jvp coming (then neither the
    checkpointed forward nor the sweep runs), else by the sweep's custom JVP rule."""
    from .._solve import backprop_solve

    opts = dataclasses.replace(opts, grad_differentiated=True)
    ys, pullback, stats = jax.vjp(lambda q: backprop_solve(prob, q, saveat, opts), p, has_aux=True)
    return (ys, stats), pullback


def _under_vmap(*trees) -> bool:
    """The backward pass is traced under jax.vmap (seen only when vmap is applied outside the
    gradient's trace; a vmap of an already traced jit gets the per-stage form, same values)."""
    def batched(a):  # jax's BatchTracer (not public) is the tracer with a batch dimension; under
        # jax.jvp (a Hessian-vector product) it sits inside the JVP tracer's primal or tangent
        if not isinstance(a, jax.core.Tracer):
            return False
        return hasattr(a, "batch_dim") or any(batched(getattr(a, f, None)) for f in ("primal", "tangent"))

    return any(batched(a) for a in jax.tree_util.tree_leaves(trees))


def _jump_terms(prob, p, lam_probe, fwd_probes, taus, t0, y0, f):
    """Σ_j ∂τ_j/∂p · λ(t0+τ_j)ᵀ[f(…, y_j = φ(t0⁻), …) - f(…, y_j = x0, …)] (DESIGN.md).

    λ(t0+τ_j) is the backward value before the impulse of an observation at that very time:
    such an observation is counted as lying before the breakpoint (the right derivative in τ,
    matching what the discrete methods return)."""
    dtype, shape, n, m = y0.dtype, y0.shape, y0.size, taus.shape[0]
    phi0 = jnp.asarray(prob.history(t0, p), dtype)
    brackets = []
    for j in range(m):
        t = t0 + taus[j]
        x_t = fwd_probes[j, :n].reshape(shape)
        lags = fwd_probes[j, n:].reshape((m,) + shape)
        jump = f(t, x_t, lags.at[j].set(phi0), p) - f(t, x_t, lags.at[j].set(y0), p)
        brackets.append(jnp.sum(lam_probe[j].reshape(shape) * jump))
    _, vjp = jax.vjp(lambda q: delays_of(prob, q, dtype, "off"), p)
    return ravel_pytree(vjp(jnp.stack(brackets))[0])[0]
