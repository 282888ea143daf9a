"""The dense-output ring buffer (solvers._history): lookups, slopes, eviction, and the
checkpoint windows InterpolatingAdjoint keeps of a DDE's history."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from solvers import _history


def _ring(cap, ends, first_coeff=lambda k: k):
    """A ring of capacity cap after pushing unit-slope steps [ends[k-1], ends[k]] (y = t on each,
    offset by first_coeff(k) so that every step is told apart), evicting freely."""
    hist = _history.empty(cap, 1, jnp.zeros((1,)))
    for k in range(1, len(ends)):
        t_a, t_b = ends[k - 1], ends[k]
        coeffs = jnp.array([[t_a + first_coeff(k)], [t_b - t_a]])
        hist, ok = _history.push(hist, t_a, t_b, coeffs, -jnp.inf, jnp.asarray(True))
    return hist


def test_history_slope_and_a_rejected_step_in_a_full_buffer():
    """lookup_derivative is the slope of the stored polynomial (the DDE adjoint's advanced
    term reads it); a rejected step written into a full buffer leaves every stored step as
    it was (it goes to the spare row)."""
    hist = _history.empty(2, 3, jnp.zeros((1,)))
    c1 = jnp.array([[1.0], [2.0], [-1.0], [0.5]])  # y(θ) = 1 + 2θ - θ² + θ³/2 on [0, 2]
    c2 = jnp.array([[2.5], [1.0], [0.0], [-0.25]])
    hist, ok1 = _history.push(hist, 0.0, 2.0, c1, -jnp.inf, jnp.asarray(True))
    hist, ok2 = _history.push(hist, 2.0, 3.0, c2, -jnp.inf, jnp.asarray(True))
    assert bool(ok1) and bool(ok2) and int(hist.count) == 2
    for q, coeffs, t_a, h in ((0.7, c1, 0.0, 2.0), (2.4, c2, 2.0, 1.0)):
        th = (q - t_a) / h
        slope = (coeffs[1] + 2 * coeffs[2] * th + 3 * coeffs[3] * th ** 2) / h
        np.testing.assert_allclose(_history.lookup_derivative(hist, q, True), slope, rtol=1e-14)
        np.testing.assert_allclose(jax.grad(lambda q: _history.lookup(hist, q, True)[0])(q), slope[0], rtol=1e-14)
    before = [np.asarray(_history.lookup(hist, q, True)) for q in (0.7, 2.4)]
    junk = jnp.full((4, 1), 99.0)
    rejected, ok = _history.push(hist, 3.0, 3.5, junk, -jnp.inf, jnp.asarray(False))
    assert bool(ok) and int(rejected.count) == 2 and int(rejected.first) == int(hist.first)
    for q, value in zip((0.7, 2.4), before):
        np.testing.assert_array_equal(_history.lookup(rejected, q, True), value)


@pytest.mark.parametrize("cap", [4, 5, 8])
@pytest.mark.parametrize("search_above", [1024, 0], ids=["count", "bisection"])
def test_step_count_before_a_time_in_a_wrapped_ring(cap, search_above, monkeypatch):
    """The count of stored steps ending before q (strictly for left lookups) matches a sorted
    search over the stored steps, with the ring wrapped and q on and between step ends; a
    lookup on a step boundary reads the left or the right step as asked. Both ways of counting
    (a reduction over the buffer; bisection, used above SEARCH_ABOVE slots)."""
    monkeypatch.setattr(_history, "SEARCH_ABOVE", search_above)
    ends = [0.0, 0.5, 1.25, 1.5, 2.5, 3.0, 3.75]  # 6 steps: a ring of 4 or 5 has wrapped
    hist = _ring(cap, ends)
    stored = np.array(ends[1:])[-min(cap, 6):]
    for q in (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 3.75):
        for left in (True, False):
            want = np.searchsorted(stored, q, side="left" if left else "right")
            assert int(_history._steps_before(hist, q, left)) == want, (q, left)
    k = 4  # the step [1.5, 2.5] and the next one [2.5, 3.0] meet at 2.5
    np.testing.assert_allclose(_history.lookup(hist, 2.5, True), [2.5 + k])
    np.testing.assert_allclose(_history.lookup(hist, 2.5, False), [2.5 + k + 1])


def test_checkpoint_windows_hold_each_step_once_and_read_back_what_the_ring_held():
    """Windows of the last τ = 1 at checkpoints 1.5, 1.5 (twice on one time), 3.0 and 3.75
    share steps in the log; each loaded window reads back the ring's values on [c - τ, c]."""
    ends = [0.0, 0.5, 1.25, 1.5, 2.5, 3.0, 3.75]
    w = _history.empty_windows(5, 8, 1, jnp.zeros((1,)))
    rings = {}
    for i, c in enumerate([1.5, 1.5, 3.0, 3.75], start=1):
        ring = _ring(4, [t for t in ends if t <= c])
        rings[i] = (ring, c)
        w = _history.save_window(w, i, ring, c - 1.0)
    assert bool(w.ok)
    # steps ending at or after c - τ (a left lookup at c - τ reads the step ending there):
    # [0, 0.5], [0.5, 1.25], [1.25, 1.5] | the same | [1.5, 2.5], [2.5, 3] | [2.5, 3] again, [3, 3.75]
    assert int(w.log.count) == 6
    np.testing.assert_array_equal(np.asarray(w.start)[1:], [0, 0, 3, 4])
    np.testing.assert_array_equal(np.asarray(w.stop)[1:], [3, 3, 5, 6])
    work = _history.empty(4, 1, jnp.zeros((1,)))
    work = _history.push(work, 7.0, 8.0, jnp.full((2, 1), 99.0), -jnp.inf, jnp.asarray(True))[0]  # stale
    for i, (ring, c) in rings.items():
        loaded = _history.load_window(work, w, i)
        for q in np.linspace(c - 1.0, c, 9):
            for left in (True, False):
                np.testing.assert_array_equal(_history.lookup(loaded, q, left), _history.lookup(ring, q, left))
    empty = _history.load_window(work, w, 0)  # checkpoint 0 (the start) keeps nothing
    assert int(empty.count) == 0


def test_checkpoint_windows_that_do_not_fit_are_flagged():
    ends = [0.0, 0.5, 1.25, 1.5, 2.5, 3.0, 3.75]
    w = _history.empty_windows(3, 3, 1, jnp.zeros((1,)))
    w = _history.save_window(w, 1, _ring(4, ends[:4]), 0.6)  # 2 steps fit
    assert bool(w.ok) and int(w.log.count) == 2
    w = _history.save_window(w, 2, _ring(4, ends), 2.75)  # 2 more do not
    assert not bool(w.ok) and int(w.log.count) == 2


def test_a_lookup_a_few_ulps_off_a_boundary_reads_the_side_it_asks_for():
    """A breakpoint's image t - τ and the stored step end it stands for are different sums of the
    same delays: (0.3 + 0.1) - 0.1 is 0.30000000000000004, one ulp past a step ending at 0.3.
    Read exactly, a left-sided lookup there took the next step (the other side of a jump in x
    at t0 = 0.3: a DDE's gradient in τ was off by 140%); within side_tolerance it counts as 0.3.
    A time well inside a step is unaffected."""
    hist = _ring(4, [0.1, 0.3, 0.5], first_coeff=lambda k: 10.0 * k)  # y = t + 10k on step k
    q = (0.3 + 0.1) - 0.1
    assert q > 0.3
    assert float(_history.lookup(hist, q, True)[0]) == pytest.approx(10.0 + q, abs=1e-12)  # step 1, left
    assert float(_history.lookup(hist, q, False)[0]) == pytest.approx(20.0 + q, abs=1e-12)  # step 2, right
    below = np.nextafter(0.3, 0.0)
    assert float(_history.lookup(hist, below, False)[0]) == pytest.approx(20.0 + below, abs=1e-12)
    assert float(_history.lookup(hist, 0.3 + 1e-9, True)[0]) == pytest.approx(20.3 + 1e-9, abs=1e-12)
    assert bool(_history.before(0.3, q, True, _history.side_tolerance(q))) is False  # at t0: history side
    assert bool(_history.before(0.3, q, True)) is True  # exactly read: the buffer's side
