# Two commands: `make demo` and `make test`. Both create .venv and install everything first.
PYTHON ?= python3.11
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
NPROC ?= 4

.PHONY: venv demo test bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned, so that no dependency pulls a multi-GB CUDA build on a CPU machine
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q --no-build-isolation -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/python -m launch local --nproc $(NPROC) -- train=demo parallel.tp=2 parallel.pp=2 \
		run.name=demo $(ARGS)

test: venv
	bash scripts/test.sh

bench: venv
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) build *.egg-info outputs
