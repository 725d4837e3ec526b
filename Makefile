# make demo  — set up .venv (if missing) and run the quick-start DIMAT job, then the same run with plain averaging (WA) and without merging
# make test  — set up .venv (if missing) and run the test suite
# make lint / make docs / make bench
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The PyTorch build to install; the default is the one this project's machines carry on disk. On a machine
# without a GPU, take the CPU-only wheels (about 0.2 GB instead of several GB of CUDA libraries):
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu TORCH_PACKAGES="torch torchvision"
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX ?=
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test lint format docs bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_PACKAGES)
	$(BIN)/python -m pip install --quiet -e '.[dev,docs]'
	touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=offline $(BIN)/lightning-dimat fit --config configs/quickstart.yaml
	WANDB_MODE=offline $(BIN)/lightning-dimat fit --config configs/quickstart.yaml --config configs/quickstart_wa.yaml
	WANDB_MODE=offline $(BIN)/lightning-dimat fit --config configs/quickstart.yaml --config configs/local_only.yaml
	$(BIN)/python examples/compare_runs.py outputs/quickstart outputs/quickstart_wa outputs/quickstart_local

# Three workers, one test file each at a time (a file's module fixtures are built once), one torch thread each:
# the 2-process tests spend much of their time waiting for a subprocess to import torch and Lightning, and a
# third worker keeps both cores busy meanwhile (measured on 2 cores: 7:44 against 8:27 with two workers).
test: $(STAMP)
	OMP_NUM_THREADS=1 WANDB_MODE=offline $(BIN)/python -m pytest -n 3 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf outputs site lightning_logs .pytest_cache
