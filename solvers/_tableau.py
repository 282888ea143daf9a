"""Explicit Runge–Kutta methods as data: frozen Butcher tableaus checked on construction.

A tableau carries its dense output as a matrix ``dense`` of shape (stages, degree):
the continuous extension is ``y(t0 + θh) = y0 + h Σ_i Σ_p dense[i][p] θ^(p+1) k_i``,
so every method stores the same thing per step (y0 and ``degree`` polynomial
coefficients) and evaluates it with Horner's rule.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpy.polynomial import polynomial as P

_TOL = 1e-12


@dataclasses.dataclass(frozen=True)
class ButcherTableau:
    """An explicit RK method: nodes ``c``, strictly lower ``a`` (row i has i entries),
    weights ``b``, error weights ``b_err = b - b_hat`` (None: no embedded estimate),
    ``order`` of ``b``, ``error_order`` of ``b_hat`` and ``dense`` (stages × degree)."""

    name: str
    c: tuple
    a: tuple
    b: tuple
    order: int
    dense: tuple
    b_err: tuple | None = None
    error_order: int | None = None

    def __post_init__(self):
        s = len(self.b)
        _require(len(self.c) == s, f"{self.name}: len(c)={len(self.c)} != stages={s}")
        _require(self.c[0] == 0.0, f"{self.name}: c[0] must be 0 for an explicit method")
        _require(len(self.a) == s - 1, f"{self.name}: a needs {s - 1} rows, got {len(self.a)}")
        for i, row in enumerate(self.a, start=1):
            _require(len(row) == i, f"{self.name}: a row {i} needs {i} entries, got {len(row)}")
            _require(abs(sum(row) - self.c[i]) < _TOL,
                     f"{self.name}: row {i} of a sums to {sum(row)!r}, not c[{i}]={self.c[i]!r}")
        A, b, c = self.a_matrix(), np.asarray(self.b), np.asarray(self.c)
        for cond, value, want in _order_conditions(A, b, c, self.order):
            _require(abs(value - want) < 1e-10,
                     f"{self.name}: order condition {cond} gives {value!r}, needs {want!r}")
        if self.b_err is not None:
            _require(len(self.b_err) == s, f"{self.name}: b_err needs {s} entries")
            _require(abs(sum(self.b_err)) < _TOL, f"{self.name}: b_err must sum to 0")
            _require(self.error_order is not None, f"{self.name}: give error_order with b_err")
            b_hat = b - np.asarray(self.b_err)
            for cond, value, want in _order_conditions(A, b_hat, c, self.error_order):
                _require(abs(value - want) < 1e-10,
                         f"{self.name}: embedded order condition {cond} gives {value!r}, needs {want!r}")
        D = np.asarray(self.dense, dtype=float)
        _require(D.ndim == 2 and D.shape[0] == s,
                 f"{self.name}: dense must have shape (stages={s}, degree), got {D.shape}")
        _require(np.allclose(D.sum(axis=1), b, rtol=0, atol=1e-10),
                 f"{self.name}: dense output at θ=1 does not reproduce b")

    @property
    def stages(self) -> int:
        return len(self.b)

    @property
    def degree(self) -> int:
        return len(self.dense[0])

    @property
    def fsal(self) -> bool:
        """First same as last: the last stage is f(t1, y1)."""
        return self.stages > 1 and self.c[-1] == 1.0 and tuple(self.a[-1]) == tuple(self.b[:-1]) \
            and self.b[-1] == 0.0

    @property
    def adaptive(self) -> bool:
        return self.b_err is not None

    def a_matrix(self) -> np.ndarray:
        s = self.stages
        A = np.zeros((s, s))
        for i, row in enumerate(self.a, start=1):
            A[i, :i] = row
        return A


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _order_conditions(A, b, c, order):
    """Butcher's conditions up to order 4 (all trees), and the quadrature ones beyond."""
    e = np.ones_like(c)
    conds = [("sum b = 1", b @ e, 1.0)]
    if order >= 2:
        conds.append(("b.c = 1/2", b @ c, 1 / 2))
    if order >= 3:
        conds += [("b.c^2 = 1/3", b @ c**2, 1 / 3), ("b.A.c = 1/6", b @ A @ c, 1 / 6)]
    if order >= 4:
        conds += [("b.c^3 = 1/4", b @ c**3, 1 / 4), ("b.(c*A.c) = 1/8", b @ (c * (A @ c)), 1 / 8),
                  ("b.A.c^2 = 1/12", b @ A @ c**2, 1 / 12), ("b.A.A.c = 1/24", b @ A @ A @ c, 1 / 24)]
    for k in range(5, order + 1):
        conds.append((f"b.c^{k - 1} = 1/{k}", b @ c ** (k - 1), 1 / k))
    return conds


def _poly_rows(polys):
    """Coefficient rows (θ^1..θ^deg) of polynomials in θ with zero constant term."""
    deg = max(len(p) for p in polys) - 1
    rows = []
    for p in polys:
        p = np.pad(np.asarray(p, float), (0, deg + 1 - len(p)))
        assert abs(p[0]) < 1e-14
        rows.append(tuple(p[1:]))
    return tuple(rows)


def _hermite_dense(b, fsal_index):
    """Cubic Hermite interpolation through y0, y1 = y0 + hΣb k, f0 = k_0, f1 = k_last."""
    s = len(b)
    rows = []
    for i in range(s):
        # y(θ) - y0 = h[ b_i(3θ²-2θ³) + δ_i0 (θ - 2θ² + θ³) + δ_i,last (θ³ - θ²) ]
        poly = np.array([0.0, 0.0, 3 * b[i], -2 * b[i]])
        if i == 0:
            poly += [0.0, 1.0, -2.0, 1.0]
        if i == fsal_index:
            poly += [0.0, 0.0, -1.0, 1.0]
        rows.append(tuple(poly[1:]))
    return tuple(rows)


def _tsit5() -> ButcherTableau:
    # Tsitouras (2011), "Runge–Kutta pairs of order 5(4) satisfying only the first column
    # simplifying assumption", Comput. Math. Appl. 62, 770–775; interpolant from the same paper.
    a = (
        (0.161,),
        (-0.008480655492356988544426874250230774675, 0.3354806554923569885444268742502307747),
        (2.897153057105493432130432594192938765, -6.359448489975074843148159912383825626,
         4.362295432869581411017727318190886861),
        (5.325864828439256604428877920840511318, -11.74888356406282787774717033978577296,
         7.495539342889836208304604784564358156, -0.09249506636175524925650207933207191611),
        (5.861455442946420028659251486982647890, -12.92096931784710929170611868178335940,
         8.159367898576158643180400794539253485, -0.07158497328140099722453054252582973869,
         -0.02826905039406838290900305721271224147),
        (0.09646076681806522951816731316512876334, 0.01, 0.4798896504144995747752495322905965199,
         1.379008574103741893192274821856872771, -3.290069515436080679901047585711363850,
         2.324710524099773982415355918398765796),
    )
    b = a[-1] + (0.0,)
    b_hat = (0.09468075576583945807478876255758922856, 0.009183565540343253096776363936645313760,
             0.4877705284247615707855642599631228242, 1.234297566930478985655109673884237654,
             -2.707712349983525454881109975059321671, 1.866628418170587035753719399566211499, 1 / 66)
    c = (0.0, 0.161, 0.327, 0.9, 0.9800255409045096857298102862870245955, 1.0, 1.0)
    x = P.polyfromroots
    polys = [
        -1.0530884977290216 * P.polymul(x([0.0, 1.3299890189751412]), [0.7139816917074209, -1.4364028541716351, 1]),
        0.1017 * P.polymul([0, 0, 1], [1.2949852507374631, -2.1966568338249754, 1]),
        2.490627285651252793 * P.polymul([0, 0, 1], [1.57803468208092486, -2.38535645472061657, 1]),
        -16.54810288924490272 * x([0, 0, 1.21712927295533244, 0.61620406037800089]),
        47.37952196281928122 * x([0, 0, 1.203071208372362603, 0.658047292653547382]),
        -34.87065786149660974 * x([0, 0, 1.2, 0.666666666666666667]),
        2.5 * x([0, 0, 1.0, 0.6]),
    ]
    return ButcherTableau("Tsit5", c, a, b, 5, _poly_rows(polys),
                          b_err=tuple(np.subtract(b, b_hat)), error_order=4)


def _dopri5() -> ButcherTableau:
    # Dormand & Prince (1980); dense output of Hairer, Nørsett & Wanner, Solving ODEs I, II.6.
    a = ((1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
         (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84))
    b = np.array(a[-1] + (0.0,))
    b_hat = np.array([5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40])
    d = np.array([-12715105075 / 11282082432, 0.0, 87487479700 / 32700410799,
                  -10690763975 / 1880347072, 701980252875 / 199316789632,
                  -1453857185 / 822651844, 69997945 / 29380423])
    e1, e7 = np.eye(7)[0], np.eye(7)[6]
    # y(θ) = y0 + θ(A + (1-θ)(B + θ(C + (1-θ)D))) expanded in powers of θ, per stage.
    dense = np.stack([e1, 3 * b - 2 * e1 - e7 + d, -2 * b + e1 + e7 - 2 * d, d], axis=1)
    c = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
    return ButcherTableau("Dopri5", c, a, tuple(b), 5, tuple(map(tuple, dense)),
                          b_err=tuple(b - b_hat), error_order=4)


def _bosh3() -> ButcherTableau:
    # Bogacki & Shampine (1989), with cubic Hermite interpolation (FSAL gives f1 for free).
    a = ((1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9))
    b = (2 / 9, 1 / 3, 4 / 9, 0.0)
    b_hat = (7 / 24, 1 / 4, 1 / 3, 1 / 8)
    return ButcherTableau("Bosh3", (0.0, 1 / 2, 3 / 4, 1.0), a, b, 3, _hermite_dense(b, 3),
                          b_err=tuple(np.subtract(b, b_hat)), error_order=2)


def _rk4() -> ButcherTableau:
    # Classical RK4 with its free third-order continuous extension.
    polys = [[0, 1, -3 / 2, 2 / 3], [0, 0, 1, -2 / 3], [0, 0, 1, -2 / 3], [0, 0, -1 / 2, 2 / 3]]
    return ButcherTableau("RK4", (0.0, 1 / 2, 1 / 2, 1.0), ((1 / 2,), (0.0, 1 / 2), (0.0, 0.0, 1.0)),
                          (1 / 6, 1 / 3, 1 / 3, 1 / 6), 4, _poly_rows(polys))


def _euler() -> ButcherTableau:
    return ButcherTableau("Euler", (0.0,), (), (1.0,), 1, ((1.0,),))


TSIT5, DOPRI5, BOSH3, RK4_TABLEAU, EULER = _tsit5(), _dopri5(), _bosh3(), _rk4(), _euler()


@dataclasses.dataclass(frozen=True)
class ExplicitRK:
    """A solver: an explicit RK tableau. Adaptive when the tableau has an error estimate."""

    tableau: ButcherTableau

    @property
    def name(self) -> str:
        return self.tableau.name


@dataclasses.dataclass(frozen=True)
class Tsit5(ExplicitRK):
    """Tsitouras 5(4), FSAL, 4th-order dense output. The default solver."""
    tableau: ButcherTableau = TSIT5


@dataclasses.dataclass(frozen=True)
class Dopri5(ExplicitRK):
    """Dormand–Prince 5(4), FSAL, 4th-order dense output."""
    tableau: ButcherTableau = DOPRI5


@dataclasses.dataclass(frozen=True)
class Bosh3(ExplicitRK):
    """Bogacki–Shampine 3(2), FSAL, cubic Hermite dense output."""
    tableau: ButcherTableau = BOSH3


@dataclasses.dataclass(frozen=True)
class RK4(ExplicitRK):
    """Classical fourth-order RK, fixed step (give ``dt0``), third-order dense output."""
    tableau: ButcherTableau = RK4_TABLEAU


@dataclasses.dataclass(frozen=True)
class Euler(ExplicitRK):
    """Forward Euler, fixed step (give ``dt0``), linear dense output."""
    tableau: ButcherTableau = EULER

