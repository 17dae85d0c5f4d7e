# The two commands of the README: `make demo` (the main job) and `make test`. Each creates .venv
# from the pinned files on first use; nothing else has to be installed by hand.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0 (CPU) is a wheel on local disk; without it pip would take a multi-GB CUDA build.
WHEELS := $(wildcard /opt/wheels)
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -q $(if $(WHEELS),--find-links $(WHEELS))
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export RAY_USAGE_STATS_ENABLED=0
export TOKENIZERS_PARALLELISM=false

.PHONY: venv demo test test-fast lock bench bench-quality bench-splits clean venv-litert test-litert bench-litert

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.lock requirements-data.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -r requirements.lock
	$(PIP_INSTALL) --no-deps -r requirements-data.txt
	$(PIP_INSTALL) --no-deps -r requirements-nodeps.txt
	$(PIP_INSTALL) --no-deps --no-build-isolation -e .
	touch $@

demo: venv
	$(VENV)/bin/fedquant simulate --config configs/default.toml --out runs/default

test: venv
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

bench: venv
	$(PY) -m bench.calibrators

# Issue 5's quality table: the main run, the runs of its variants (each resumes if already done),
# then the peer tools on the same data and the README table. About 3 hours on 2 cores with the peer
# calibrations cached: the sum of the runs' wall_s (summary.json) and bench/quality.py's wall_s.
QUALITY_RUNS := runs/default=fedquant runs/q-nosmooth="fedquant, no smoothing" \
	runs/q-sample10="fedquant, 10% per round" runs/q-sample30="fedquant, 30% per round" runs/q-iid="fedquant, IID" \
	runs/q-w8a16="fedquant, 8/16" runs/q-lsq4="fedquant, lsq by profile" \
	runs/q-distill="fedquant, lsq by profile, distill" runs/q-exact="fedquant, exact rules" \
	runs/q-runtime="fedquant, lsq on the runtime" runs/q-handplan="fedquant, hand-written mixed plan" \
	runs/q-static="fedquant, static down_proj inputs" runs/q-torch-lsq="fedquant, torch lsq"
bench-quality: venv
	$(VENV)/bin/fedquant simulate --config configs/default.toml --out runs/default
	$(VENV)/bin/fedquant simulate --config configs/quality/nosmooth.toml --out runs/q-nosmooth
	$(VENV)/bin/fedquant simulate --config configs/quality/sample10.toml --out runs/q-sample10 --prepared-from runs/default
	$(VENV)/bin/fedquant simulate --config configs/quality/sample30.toml --out runs/q-sample30 --prepared-from runs/default
	$(VENV)/bin/fedquant simulate --config configs/quality/iid.toml --out runs/q-iid
	$(VENV)/bin/fedquant simulate --config configs/quality/w8a16.toml --out runs/q-w8a16
	$(VENV)/bin/fedquant simulate --config configs/quality/lsq4.toml --out runs/q-lsq4 --prepared-from runs/default
	$(VENV)/bin/fedquant simulate --config configs/quality/distill.toml --out runs/q-distill
	$(VENV)/bin/fedquant simulate --config configs/quality/exact.toml --out runs/q-exact --prepared-from runs/default
	$(VENV)/bin/fedquant simulate --config configs/quality/runtime.toml --out runs/q-runtime --prepared-from runs/default
	$(VENV)/bin/fedquant simulate --config configs/quality/handplan.toml --out runs/q-handplan
	$(VENV)/bin/fedquant simulate --config configs/quality/static.toml --out runs/q-static
	$(VENV)/bin/fedquant simulate --config configs/quality/torch_lsq.toml --out runs/q-torch-lsq --prepared-from runs/default
	$(VENV)/bin/fedquant simulate --config configs/quality/rotated.toml --out runs/q-rotated
	$(VENV)/bin/fedquant simulate --config configs/quality/gptq.toml --out runs/q-gptq
	$(PY) -m bench.quality --runs $(QUALITY_RUNS)
	$(PY) -m bench.readme_tables

# Issue 19, goal 3: the main job on three role splits (data.seed 0 1 2), one run at a time (about 30-35 min
# and 6.5 GB each); finished runs in runs/splits/ are read again, an unfinished one resumes.
bench-splits: venv
	$(PY) -m bench.splits

# The optional LiteRT extra (issue 18) in its own venv: the base lock, then requirements-litert.txt with
# --no-deps (its one conflicting pin is explained there), torch held at 2.13.0 throughout.
VENV_LITERT := .venv-litert
PY_LITERT := $(VENV_LITERT)/bin/python
PIP_LITERT := $(PY_LITERT) -m pip install --disable-pip-version-check -q $(if $(WHEELS),--find-links $(WHEELS))
venv-litert: $(VENV_LITERT)/.installed

$(VENV_LITERT)/.installed: requirements.lock requirements-data.txt requirements-nodeps.txt requirements-litert.txt pyproject.toml
	test -x $(PY_LITERT) || $(PYTHON) -m venv $(VENV_LITERT)
	$(PIP_LITERT) -r requirements.lock
	$(PIP_LITERT) --no-deps -r requirements-data.txt
	$(PIP_LITERT) --no-deps -r requirements-nodeps.txt
	$(PIP_LITERT) --no-deps -r requirements-litert.txt
	$(PIP_LITERT) --no-deps --no-build-isolation -e .
	$(PY_LITERT) -c "import torch, ai_edge_litert.interpreter, litert_torch, ai_edge_quantizer, pydantic; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

test-litert: venv-litert
	$(PY_LITERT) -m pytest -q tests/test_litert.py tests/test_litert_fleet.py

# The LiteRT rows (bench/results/litert.json) from the main run's QParams; SmolLM2, heavy.
bench-litert: venv-litert
	$(PY_LITERT) -m bench.litert --run runs/default

# Regenerate the lock from requirements.txt in a scratch venv (needs the package registry).
lock:
	rm -rf /tmp/fedquant-lock && $(PYTHON) -m venv /tmp/fedquant-lock
	/tmp/fedquant-lock/bin/pip install -q $(if $(WHEELS),--find-links $(WHEELS)) -r requirements.txt
	/tmp/fedquant-lock/bin/pip freeze --exclude-editable | grep -v '^fedquant' > requirements.lock

clean:
	rm -rf $(VENV) $(VENV_LITERT)
