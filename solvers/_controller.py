"""Step-size control: constant steps, and Hairer's PI controller for embedded pairs."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


def rms_norm(x):
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def error_norm(err, y0, y1, rtol, atol):
    scale = atol + rtol * jnp.maximum(jnp.abs(y0), jnp.abs(y1))
    return rms_norm(err / scale)


@dataclasses.dataclass(frozen=True)
class ConstantStepSize:
    """Steps of exactly ``dt0`` (shortened only to land on breakpoints and save times)."""

    def init_state(self, dtype):
        return jnp.asarray(1.0, dtype)

    def adapt(self, h, h_default, err, last_rejected, prev_err, error_order):
        return jnp.asarray(True), h_default, prev_err


@dataclasses.dataclass(frozen=True)
class PIController:
    """Hairer's PI step-size controller (Solving ODEs I, II.4 and the DOPRI5 code).

    h_new = h · clip(safety · err^(-α) · err_prev^β, 1/min_factor..., max_factor) with
    α = 1/(q+1) - 0.75 β, β = beta_scale/(q+1), q the order of the embedded estimate;
    no growth right after a rejection.
    """

    safety: float = 0.9
    min_factor: float = 0.2
    max_factor: float = 10.0
    beta_scale: float = 0.2

    def __post_init__(self):
        if not 0 < self.safety <= 1:
            raise ValueError(f"PIController: safety must be in (0, 1], got {self.safety!r}")
        if not 0 < self.min_factor < 1 < self.max_factor:
            raise ValueError("PIController: need 0 < min_factor < 1 < max_factor, got "
                             f"min_factor={self.min_factor!r}, max_factor={self.max_factor!r}")

    def init_state(self, dtype):
        return jnp.asarray(1e-4, dtype)

    def adapt(self, h, h_default, err, last_rejected, prev_err, error_order):
        q1 = error_order + 1
        beta = self.beta_scale / q1
        alpha = 1.0 / q1 - 0.75 * beta
        finite = jnp.isfinite(err)
        err_safe = jnp.where(finite, jnp.maximum(err, 1e-10), 1.0)
        accept = finite & (err <= 1.0)
        grow = self.safety * err_safe ** (-alpha) * prev_err ** beta
        max_f = jnp.where(last_rejected, 1.0, self.max_factor)
        fac_ok = jnp.clip(grow, self.min_factor, max_f)
        fac_bad = jnp.clip(self.safety * err_safe ** (-alpha), self.min_factor, 1.0)
        fac = jnp.where(accept, fac_ok, jnp.where(finite, fac_bad, self.min_factor))
        new_prev = jnp.where(accept, jnp.maximum(err_safe, 1e-4), prev_err)
        return accept, h * fac, new_prev


def initial_step(f0, y0, t0, t_span, order, rtol, atol, cap, rhs_at):
    """Hairer's starting step (Solving ODEs I, II.4): two rhs evaluations' worth of data."""
    scale = atol + rtol * jnp.abs(y0)
    d0 = rms_norm(y0 / scale)
    d1 = rms_norm(f0 / scale)
    h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / jnp.maximum(d1, 1e-300))
    h0 = jnp.minimum(jnp.minimum(h0, t_span), cap)
    f1 = rhs_at(t0 + h0, y0 + h0 * f0)
    d2 = rms_norm((f1 - f0) / scale) / h0
    dmax = jnp.maximum(d1, d2)
    h1 = jnp.where(dmax <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3),
                   (0.01 / jnp.maximum(dmax, 1e-300)) ** (1.0 / (order + 1)))
    return jnp.minimum(jnp.minimum(100 * h0, h1), t_span)
