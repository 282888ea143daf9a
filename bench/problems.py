"""The benchmark problems (shared by bench/solve.py and later bench scripts)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def mlp_init(key, sizes, dtype):
    params = []
    for k, (n_in, n_out) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        params.append((jax.random.normal(k, (n_in, n_out), dtype) / np.sqrt(n_in), jnp.zeros((n_out,), dtype)))
    return params


def mlp(params, x):
    for w, b in params[:-1]:
        x = jnp.tanh(x @ w + b)
    w, b = params[-1]
    return x @ w + b


def hnn_setup(B=256, dtype=jnp.float64, seed=0):
    """MLP 2-64-64-1 tanh Hamiltonian, rhs = J grad_x H with jax.grad inside, B as one system."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = mlp_init(k1, [2, 64, 64, 1], dtype)
    x0 = jax.random.uniform(k2, (B, 2), dtype, -1.0, 1.0)
    J = jnp.array([[0.0, 1.0], [-1.0, 0.0]], dtype)
    H = lambda x, p: jnp.sum(mlp(p, x))
    rhs = lambda t, x, p: jax.grad(H)(x, p) @ J.T
    return H, J, rhs, params, x0


def diffrax_solve(rhs, x0, ts, p, adjoint=None, t1=10.0):
    """The peer's solve of the benchmarks' ODEs: diffrax Tsit5 on [0, t1], PID controller at
    rtol 1e-6, atol 1e-8 (its I-controller default form), saves at ts, max_steps 4096
    (``adjoint`` None: diffrax's default, RecursiveCheckpointAdjoint)."""
    import diffrax

    extra = {} if adjoint is None else {"adjoint": adjoint}
    return diffrax.diffeqsolve(diffrax.ODETerm(rhs), diffrax.Tsit5(), 0.0, t1, None, x0, args=p,
                               saveat=diffrax.SaveAt(ts=ts), max_steps=4096,
                               stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-8), **extra)


def ndde_setup(B=256, dtype=jnp.float64, seed=1):
    """MLP 4-64-64-2 on [x(t), x(t - tau)], tau = 1, constant history."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = mlp_init(k1, [4, 64, 64, 2], dtype)
    x_hist = jax.random.uniform(k2, (B, 2), dtype, -1.0, 1.0)
    rhs = lambda t, x, lag, p: mlp(p, jnp.concatenate([x, lag[0]], axis=-1)) - 0.5 * x
    return rhs, params, x_hist


def rk4_method_of_steps(rhs, params, x_hist, tau, T, n_per_tau, saveat_every=None, remat=False):
    """A plain fixed-step RK4 method-of-steps loop (lax.scan): step h = tau / n_per_tau, lagged
    stage values from the stored grid (c = 0, 1) and cubic Hermite at half steps (c = 1/2).
    remat: recompute each step in the backward pass (jax.checkpoint) instead of storing it."""
    h = tau / n_per_tau
    n = int(round(T / h))
    lag_idx = n_per_tau  # grid index offset of tau
    xs = jnp.zeros((n + 1,) + x_hist.shape, x_hist.dtype).at[0].set(x_hist)
    fs = jnp.zeros_like(xs)

    def lag_at(xs, fs, i, frac):  # x(t_i + frac*h - tau); indices < 0 are the constant history
        j = i - lag_idx
        y0 = jnp.where(j >= 0, xs[jnp.maximum(j, 0)], x_hist)
        y1 = jnp.where(j + 1 >= 0, xs[jnp.maximum(j + 1, 0)], x_hist)
        f0 = jnp.where(j >= 0, fs[jnp.maximum(j, 0)], 0.0)
        f1 = jnp.where(j + 1 > 0, fs[jnp.maximum(j + 1, 0)], 0.0)  # x'(0-) is the history's
        if frac == 0.0:
            return y0
        if frac == 1.0:
            return y1
        th = frac
        return ((1 - th) * y0 + th * y1 + th * (th - 1) * ((1 - 2 * th) * (y1 - y0) + (th - 1) * h * f0 + th * h * f1))

    def body(carry, i):
        xs, fs = carry
        t = i * h
        y = xs[i]
        k1 = rhs(t, y, lag_at(xs, fs, i, 0.0)[None], params)
        fs = fs.at[i].set(k1)
        mid = lag_at(xs, fs, i, 0.5)[None]
        k2 = rhs(t + h / 2, y + h / 2 * k1, mid, params)
        k3 = rhs(t + h / 2, y + h / 2 * k2, mid, params)
        k4 = rhs(t + h, y + h * k3, lag_at(xs, fs, i, 1.0)[None], params)
        xs = xs.at[i + 1].set(y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4))
        return (xs, fs), None

    (xs, fs), _ = jax.lax.scan(jax.checkpoint(body) if remat else body, (xs, fs), jnp.arange(n))
    return xs
