"""`ndde demo` (what `make demo` runs) writes its picture and gets the delay gradient right."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_writes_png_and_exact_delay_gradient(tmp_path):
    out = tmp_path / "demo"
    subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--out", str(out)], check=True, timeout=600)
    summary = json.loads((out / "demo.json").read_text())
    assert (out / "demo.png").stat().st_size > 10_000
    assert abs(summary["dx_T_dtau"] - 0.10590187277649088) < 1e-6


def test_cli_help_lists_demo():
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True,
                            check=True)
    assert "demo" in result.stdout
