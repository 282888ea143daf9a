"""The trainable models of the shipped jobs, each a neural ODE/DDE whose right-hand side
contains a derivative of a network:

* ``hnn``: dx/dt = J ∇H_θ(x), H an MLP (``GradientField``), x = (q, p).
* ``ndde``: dx/dt = MLP_θ([x(t), x(t - τ)]), τ learned; constant history from the data.
* ``delayed_gradient``: dx/dt = g(f(x(t)), ∇f(x(t - τ))) with g(u, v) = -v / (1 + u²), f an
  MLP, τ learned, history φ(t) = x0 + t v with v learned.

A model is ``init(key) -> theta`` plus ``solve(theta, sample, ts) -> Solution`` for one
trajectory; ``sample`` holds the trajectory's data (``x0``, ``history``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import solvers as sv

from .config import JobConfig

STATE_DIM = {"hnn": 2, "ndde": 1, "delayed_gradient": 2}


def mlp_init(key, sizes, dtype):
    layers = []
    for k, (n_in, n_out) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        layers.append({"w": (jax.random.normal(k, (n_in, n_out), dtype) / np.sqrt(n_in)).astype(dtype),
                       "b": jnp.zeros((n_out,), dtype)})
    return layers


def mlp(layers, x):
    for layer in layers[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ layers[-1]["w"] + layers[-1]["b"]


def make_solver(name):
    return {"tsit5": sv.Tsit5, "dopri5": sv.Dopri5, "bosh3": sv.Bosh3}[name]()


def make_sensitivity(name, checkpoints):
    return {"backprop": lambda: sv.Backprop(checkpoints=checkpoints), "forward": sv.ForwardMode,
            "backsolve": sv.BacksolveAdjoint, "interpolating": lambda: sv.InterpolatingAdjoint(checkpoints),
            "quadrature": sv.QuadratureAdjoint}[name]()


@dataclasses.dataclass(frozen=True)
class Model:
    kind: str
    init: Callable          # key -> theta
    problem: Callable       # (t1) -> problem whose p is {"theta": theta, "sample": sample}
    dtype: object

    def solve(self, job: JobConfig, theta, sample, ts, sensitivity=None, throw=True):
        s = job.solver
        sens = make_sensitivity(s.sensitivity, s.checkpoints) if sensitivity is None else sensitivity
        return sv.solve(self.problem(ts[-1]), {"theta": theta, "sample": sample}, saveat=ts,
                        solver=make_solver(s.method), rtol=s.rtol, atol=s.atol, sensitivity=sens,
                        max_steps=s.max_steps, history_size=s.history_size or None, throw=throw)

    def tau(self, theta):
        return theta.get("tau")


def _hnn(job, dtype):
    J = sv.canonical_hamiltonian_j(2).astype(dtype)
    sizes = [2, *job.model.hidden, 1]
    init = lambda key: {"H": mlp_init(key, sizes, dtype)}
    H = lambda x, p: jnp.sum(mlp(p["theta"]["H"], x))
    problem = lambda t1: sv.ODEProblem(sv.GradientField(H, J), x0=lambda p: p["sample"]["x0"], t0=0.0, t1=t1)
    return init, problem


def _ndde(job, dtype):
    sizes = [2, *job.model.hidden, 1]

    def init(key):
        return {"f": mlp_init(key, sizes, dtype), "tau": jnp.asarray(job.model.tau_init, dtype)}

    rhs = lambda t, x, lag, p: mlp(p["theta"]["f"], jnp.concatenate([x, lag[0]]))
    history = lambda t, p: p["sample"]["history"] + 0.0 * t
    delays = lambda p: jnp.reshape(p["theta"]["tau"], (1,))
    return init, lambda t1: sv.DDEProblem(rhs, history, delays, 0.0, t1)


def _delayed_gradient(job, dtype):
    sizes = [2, *job.model.hidden, 1]

    def init(key):
        return {"f": mlp_init(key, sizes, dtype), "tau": jnp.asarray(job.model.tau_init, dtype),
                "v": jnp.zeros((2,), dtype)}

    def rhs(t, x, lag, p):
        f = lambda z: mlp(p["theta"]["f"], z)[0]
        u, v = f(x), jax.grad(f)(lag[0])
        return -v / (1.0 + u**2)

    history = lambda t, p: p["sample"]["history"] + t * p["theta"]["v"]
    delays = lambda p: jnp.reshape(p["theta"]["tau"], (1,))
    return init, lambda t1: sv.DDEProblem(rhs, history, delays, 0.0, t1)


def build_model(job: JobConfig) -> Model:
    if job.solver.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if job.solver.dtype == "float64" else jnp.float32
    init, problem = {"hnn": _hnn, "ndde": _ndde, "delayed_gradient": _delayed_gradient}[job.model.kind](job, dtype)
    return Model(job.model.kind, init, problem, dtype)


def init_params(job: JobConfig):
    model = build_model(job)
    return model.init(jax.random.PRNGKey(job.model.seed))
