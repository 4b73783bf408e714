# Two commands do all the set-up on a fresh machine:
#   make sweep   - create .venv if missing, install stridelab, run the main job
#   make test    - same set-up, then the test suite
# The venv is rebuilt only when pyproject.toml changes (a stamp file named after its hash).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1

.PHONY: install sweep test bench gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -c "import torch, torchvision, cleanfid.fid, diffusers, ray, optuna, mlflow, pyarrow"
	rm -f $(VENV)/.installed-*
	touch $@

# The default sweep: bundled digits DDPM, NFE 10, local Ray, MLflow in ./mlflow.db, results in results/sweep/.
sweep: $(STAMP)
	$(VENV)/bin/stridelab sweep $(SWEEP_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/run_all.py
	$(PY) benchmarks/bench_solver_schedules.py
	$(PY) benchmarks/bench_sample_scale.py
	$(PY) benchmarks/bench_methods.py
	$(PY) benchmarks/bench_engine.py

# GPU readiness (at most ~5 minutes): writes docs/GPU.md on a CUDA machine; elsewhere one line, exit 0.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) results
