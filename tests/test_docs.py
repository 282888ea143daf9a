"""The README's example runs and prints what it claims."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


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
