# Quickstart: `make train` then `make test`. Variables: PYTHON, TORCH (the torch pin installed when
# torch is missing; CI's CPU build is torch==2.13.0), SHAKESPEARE_TXT (a local input.txt: no download).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
TORCH ?= torch==2.13.0
SHAKESPEARE_TXT ?=
SHAKESPEARE_SHARDS := data/shakespeare_char/train_000000.bin

.PHONY: install install-dev data train test bench clean-logs help

help:
	@echo "make train   install, prepare tiny Shakespeare, train the quickstart model, print its certificate"
	@echo "make test    install dev requirements and run the test suite"
	@echo "make bench   benchmark constraints and training steps on this machine"

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -q -r requirements.txt

install-dev: install
	$(PIP) install -q -r requirements-dev.txt

$(SHAKESPEARE_SHARDS):
	$(PYTHON) data/shakespeare_char.py $(if $(SHAKESPEARE_TXT),--input "$(SHAKESPEARE_TXT)")

data: $(SHAKESPEARE_SHARDS)

train: install data
	$(PYTHON) train_gpt.py --config configs/quickstart.toml

test: install-dev data
	$(PYTHON) -m pytest -q tests

bench: install-dev data
	$(PYTHON) scripts/bench_constraints.py
	$(PYTHON) scripts/bench_step.py --config configs/shakespeare_char.toml --dtype bf16
