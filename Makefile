# vlmtune: `make demo` trains the tiny demo; `make test` runs the suite. Both build .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch goes in first and pinned: an unpinned torch pulls gigabytes of CUDA packages (FACTS.md).
TORCH ?= torch==2.13.0

.PHONY: install install-dev install-lmms demo test test-fast lint format docs bench clean

# install: what `vlmtune` needs (the demo); install-dev adds the test tools and triton (~1 GB, for the
# kernel tests under its CPU interpreter), so a first `make demo` does not download them.
install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e .
	touch $@

# install-dev includes lmms-eval, so the suite scores a run folder through it (tests/test_lmms_eval.py).
$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,lmms]"
	$(BIN)/python -m pip install -q --no-deps "$(LMMS_EVAL)"
	touch $@

# install-lmms: lmms-eval, to run its benchmarks on a run folder (docs/after-training.md), about 15 s.
# --no-deps: its dependency list pulls torchvision (broken beside this CPU torch) and its model zoo's
# runtimes; the `lmms` extra holds what its evaluator needs.
LMMS_EVAL ?= lmms-eval==0.7.3
install-lmms: $(VENV)/.installed
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[lmms]"
	$(BIN)/python -m pip install -q --no-deps "$(LMMS_EVAL)"

demo: install
	$(BIN)/vlmtune train recipes/demo.yaml

# Two workers (pytest-xdist), one torch thread each: a file's tests stay on one worker so its module
# fixtures (trained runs) are built once. OMP_NUM_THREADS=1: torch's default thread count made tests
# up to 11x slower on this shared 2-core machine (FACTS.md).
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(or $(WORKERS),2) --dist loadfile

test: install-dev
	$(PYTEST)

test-fast: install-dev
	$(PYTEST) -m "not slow"

lint: install-dev
	$(BIN)/ruff check vlmtune tests bench scripts
	$(BIN)/ruff format --check vlmtune tests bench scripts

format: install-dev
	$(BIN)/ruff check --fix vlmtune tests bench scripts
	$(BIN)/ruff format vlmtune tests bench scripts

docs: install-dev
	$(BIN)/python scripts/gen_recipe_reference.py

bench: install-dev
	$(BIN)/python bench/cli_startup.py
	$(BIN)/python bench/compare.py

clean:
	rm -rf $(VENV) .cache runs .pytest_cache
