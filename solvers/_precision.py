"""Matmul precision of a solve (DESIGN.md, JAX mechanics: float32 on GPUs).

JAX's default float32 matmul on GPUs and TPUs rounds its inputs to TF32/bfloat16 (~3 decimal
digits): a right-hand side evaluated so is noise at the 1e-3 level, the error estimate never
falls below rtol, and the step count explodes (diffrax exhausted max_steps on this project's
HNN). The problem's functions are therefore traced under ``jax.default_matmul_precision``
(``solve(..., matmul_precision="highest")``, the default): the wrapper below enters it on
every call, so a trace made later — a custom VJP's backward pass, the checkpointed loop's
recomputation — gets it too, and the transposed products inherit it. The solver's own few
contractions pass ``precision=HIGHEST`` explicitly. On CPUs float32 products are exact
already: nothing changes there.
"""

from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax

HIGHEST = jax.lax.Precision.HIGHEST  # for the solver's own products


class Precise(eqx.Module):
    """``fn`` called, and so traced, under ``jax.default_matmul_precision(precision)``."""

    fn: Callable
    precision: str = eqx.field(static=True)

    def __call__(self, *args):
        with jax.default_matmul_precision(self.precision):
            return self.fn(*args)


def check_precision(precision) -> None:
    if precision is None:
        return
    try:
        with jax.default_matmul_precision(precision):
            pass
    except (ValueError, TypeError) as err:
        raise ValueError(f"matmul_precision must be None or one of JAX's precisions (\"highest\", \"high\", "
                         f"\"default\", \"float32\", \"tensorfloat32\", \"bfloat16\"), got {precision!r}") from err


def with_precision(prob, precision):
    """``prob`` with each of its functions wrapped in ``Precise`` (a GradientField's H and extra
    inside it, so that the adjoints still recognise the field); unchanged when precision is None."""
    from ._problem import map_functions  # _problem uses HIGHEST

    if precision is None:
        return prob
    return map_functions(prob, lambda fn: fn if isinstance(fn, Precise) else Precise(fn, precision))
