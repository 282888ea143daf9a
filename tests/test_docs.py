"""The README's example runs and prints what it claims."""

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.slow
def test_readme_example_runs_and_matches_its_comments():
    text = README.read_text()
    block = re.search(r"## Example.*?```python\n(.*?)```", text, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README.md", "exec"), {})
    printed = out.getvalue()
    assert "0.11125965923" in printed  # x(3.5), refcase A_jump
    assert "0.10590187" in printed  # dx(T)/dtau, refcase A_jump


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


@pytest.mark.slow
def test_seed_example_every_method_agrees_and_the_hvp_matches():
    """examples/nested_ad_dde.py (the question in shared/seed/): every DDE method on a rhs with
    f and f' of a network agrees with the others and with central differences; its
    Hessian-vector product matches differences of gradients (it was off by 1.6e-2 while the
    saved value at a moving breakpoint had only a first-order term)."""
    import runpy

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(str(README.parent / "examples" / "nested_ad_dde.py"), run_name="__main__")
    printed = out.getvalue()
    number = lambda label: float(re.search(label + r": ([0-9.e+-]+)", printed).group(1))
    assert number("worst relative difference between methods") < 1e-6
    assert number("worst relative difference to finite differences") < 1e-5
    assert number("Hessian-vector product vs differences of gradients") < 1e-5


@pytest.mark.slow
def test_delay_learning_example_recovers_the_delay():
    """examples/learn_delay.py: Adam on the default adjoint's gradient takes τ from 0.5 to the
    true 1.0 (1.0076 after 400 steps) and a from 0.8 to 1.2 on 16 trajectories of
    x' = -1.2 x(t - 1)."""
    import runpy

    module = runpy.run_path(str(README.parent / "examples" / "learn_delay.py"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        p, final = module["train"]()
    assert abs(float(p["tau"]) - 1.0) < 0.02 and abs(float(p["a"]) - 1.2) < 0.01, out.getvalue()
    assert final < 1e-6, out.getvalue()
