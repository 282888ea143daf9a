# `make demo`: set up and run the main job. `make test`: set up and run every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test,bench,mpi]'
	touch $(STAMP)

# The main job: a Hamiltonian net on pendulum data, trained on an embedded Dask cluster
# (2 worker processes), HDF5 checkpoints in runs/demo/checkpoints, report in runs/demo/report.png.
demo: $(STAMP)
	rm -rf runs/demo
	$(VENV)/bin/ndde train jobs/hnn_pendulum.toml --run-dir runs/demo --backend dask --workers 2
	$(VENV)/bin/ndde report runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n auto

bench: $(STAMP)
	$(PY) bench/solve.py

clean:
	rm -rf $(VENV) runs data .pytest_cache
