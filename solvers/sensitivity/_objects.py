"""Sensitivities are small frozen objects passed to ``solve(..., sensitivity=...)``.

| object | family | ODE | DDE |
|---|---|---|---|
| Backprop(checkpoints) | discretize-then-optimize: reverse through the accepted steps | yes | yes |
| ForwardMode() | forward sensitivities (jvp through the solver), a custom JVP | yes | yes |
| BacksolveAdjoint() | continuous adjoint, state re-integrated backward | yes | error |
| InterpolatingAdjoint(checkpoints) | continuous adjoint, forward re-solved per segment | yes | yes |
| QuadratureAdjoint() | continuous adjoint, dense forward kept, dL/dp by quadrature | yes | yes |

The default is ``InterpolatingAdjoint(checkpoints=16)``: memory flat in the number of steps
(N checkpoints plus one segment of dense output), cost a small multiple of the forward solve
independent of the number of parameters, and the exact delay gradient (with its
discontinuity term) for DDEs. Use ``Backprop`` for the exact gradient of the discrete
solution (e.g. at loose tolerances, where the continuous adjoint's gradient differs from it
by O(tolerance); with a rhs that has kinks, a ReLU network, the discrete solution's gradient
is itself far from the exact one: 0.65% at rtol 1e-10 on the README's example, where the
adjoints are within 1.2e-5), ``ForwardMode`` when p has only a handful of entries.
"""

from __future__ import annotations

import dataclasses


class AbstractSensitivity:
    """Base class of every sensitivity object."""

    supports_dde: bool = True


def _check_checkpoints(owner, value, allow_none):
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}: checkpoints must be a positive int{' or None' if allow_none else ''}, "
                         f"got {value!r}")


@dataclasses.dataclass(frozen=True)
class Backprop(AbstractSensitivity):
    """Reverse-mode through the solver's accepted steps.

    ``checkpoints=None`` (the default): for an ODE, the forward keeps loop states in
    ⌈√max_steps⌉ slots (a power of 2; 64 for max_steps 4096): every state until they are full,
    then every 2nd, 4th, ... (the stride doubles, half the slots freed), and a list of the
    accepted attempts. The reverse pass, which then knows the step count, re-runs each segment
    between stored states once (not at all while the attempts fit the slots) and takes the VJP
    of accepted attempts only (a rejected one's is the identity). Memory: 2⌈√max_steps⌉ states
    and one int per attempt. For a DDE, and for an int ``checkpoints``: equinox's
    online-checkpointed while loop (Stumm and Walther) with that many stored states (None:
    ⌊√(2 max_steps)⌋), since a DDE's state holds its whole history buffer. On the HNN benchmark
    (bench/README.md) the ODE loop takes 0.86-0.92x the checkpointed loop's time, 0.87x under
    vmap.

    For a DDE (Backprop and ForwardMode alike) the steps are those of a recording solve whose
    step control norms, beside x, its tangent along one fixed direction of p
    (``solvers/_directional.py``): where x alone is a polynomial the method integrates exactly
    (f_x = 0, constant history) the steps would otherwise be τ long and the derivative's error
    would not fall with the tolerance. The recording solve costs one JVP of the rhs per stage,
    and the value returned under ``jax.grad`` is that of its steps: within the tolerance of the
    plain solve's value, not equal to it bit for bit."""

    checkpoints: int | None = None

    def __post_init__(self):
        _check_checkpoints("Backprop", self.checkpoints, allow_none=True)


@dataclasses.dataclass(frozen=True)
class ForwardMode(AbstractSensitivity):
    """Forward sensitivities: one jvp of the solve per entry of p (cheap for few parameters).
    Its derivative rule is a custom JVP (the Jacobian times the tangents), so besides
    ``jax.grad`` it supports ``jax.linearize`` of the solve, which the other methods' custom
    VJPs cannot: use it with forward-mode least-squares solvers (optimistix ``jac="fwd"``)."""


@dataclasses.dataclass(frozen=True)
class BacksolveAdjoint(AbstractSensitivity):
    """Continuous adjoint with x re-integrated backward alongside λ (no forward storage).
    ODEs only: a DDE's past cannot be re-integrated backward stably."""

    supports_dde = False


@dataclasses.dataclass(frozen=True)
class InterpolatingAdjoint(AbstractSensitivity):
    """Continuous adjoint; the forward pass keeps ``checkpoints`` loop states (for a DDE each
    with the dense output of the last max τ) and the backward sweep re-solves each segment the
    final history buffer no longer holds. Checkpoint i is the end of the first forward step at
    or after t0 + i(t1 - t0)/checkpoints (moved to the nearest observation or forward
    breakpoint within half a segment): checkpoints never add a step, so the forward under
    ``jax.grad`` takes the plain solve's steps and returns its values bit for bit. A DDE's
    checkpoints share one log of ``history_size`` steps (a step within max τ of several
    checkpoints is kept once); if it overflows, the solve says to raise history_size or use
    fewer checkpoints."""

    checkpoints: int = 16

    def __post_init__(self):
        _check_checkpoints("InterpolatingAdjoint", self.checkpoints, allow_none=False)


@dataclasses.dataclass(frozen=True)
class QuadratureAdjoint(AbstractSensitivity):
    """Continuous adjoint; the whole dense forward solution is kept (history_size steps),
    λ alone is integrated backward and dL/dp is accumulated by Gauss–Legendre quadrature
    over each backward step."""

    nodes: int = 4

    def __post_init__(self):
        if not isinstance(self.nodes, int) or isinstance(self.nodes, bool) or not 1 <= self.nodes <= 8:
            raise ValueError(f"QuadratureAdjoint: nodes must be an int in 1..8, got {self.nodes!r}")


def default_sensitivity() -> AbstractSensitivity:
    return InterpolatingAdjoint(checkpoints=16)
