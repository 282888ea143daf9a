"""ndde.solvers: ODE and DDE solvers in JAX with breakpoint tracking, dense history and
every sensitivity method (see ``solvers.sensitivity``)."""

from ._compare import Comparison, compare_sensitivities
from ._controller import ConstantStepSize, PIController
from ._problem import DDEProblem, GradientField, ODEProblem, canonical_hamiltonian_j
from ._solve import Solution, solve
from ._tableau import RK4, Bosh3, ButcherTableau, Dopri5, Euler, ExplicitRK, Tsit5
from .sensitivity import BacksolveAdjoint, Backprop, ForwardMode, InterpolatingAdjoint, QuadratureAdjoint

__all__ = [
    "ODEProblem", "DDEProblem", "GradientField", "canonical_hamiltonian_j", "solve", "Solution",
    "ExplicitRK", "ButcherTableau", "Tsit5", "Dopri5", "Bosh3", "RK4", "Euler",
    "PIController", "ConstantStepSize",
    "compare_sensitivities", "Comparison",
    "Backprop", "ForwardMode", "BacksolveAdjoint", "InterpolatingAdjoint", "QuadratureAdjoint",
]
