"""``pipeline.Model``: what a job's ``[model] entry = "module:function"`` returns.

The function takes ``[model.options]`` as keyword arguments and returns a ``Model``:

* ``init(key) -> params``: any pytree whose array leaves are float arrays (dicts, lists,
  equinox modules such as ``eqx.nn.MLP``). Leaves that are not arrays (an MLP's activation
  function) are part of the model, not trained and not checkpointed.
* ``rhs(t, x, lagged, params)`` for a DDE (``lagged[j] = x(t - delays(params)[j])``, shape
  (m, d)), or ``rhs(t, x, params)`` for an ODE; for an ODE it may be a
  ``solvers.GradientField(H, J)`` with ``H(x, params)``.
* ``delays(params) -> (m,)``: None makes the model an ODE.
* ``history(t, params, x0)``: the state before t0 (DDE); None: the trajectory's constant x0.

The state size d is the data's; the pipeline refuses an rhs whose output has another shape.
This module imports nothing heavy: ``import pipeline`` stays fast for the ``ndde`` command.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Model:
    """A trainable neural ODE/DDE (see the module docstring for each function's signature).

    Example:
        >>> import jax.numpy as jnp
        >>> decay = Model(init=lambda key: {"a": jnp.asarray(-1.0)}, rhs=lambda t, x, params: params["a"] * x)
    """

    init: Callable
    rhs: Callable
    delays: Callable | None = None
    history: Callable | None = None

    @property
    def is_dde(self) -> bool:
        return self.delays is not None
