# Two commands for a fresh machine: `make demo` (main job on the embedded default) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv slurm demo test test-fast lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# No CUDA here: take the CPU wheel (a bare `torch` would pull a multi-GB CUDA build).
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e '.[dev,mpi]'
	touch $(STAMP)

venv: $(STAMP)

# Real SLURM clusters for the launcher tests (Debian slurm-wlm; root only): one node, and several nodes as network
# namespaces (iproute2's `ip`). Best effort: without them those tests skip.
slurm:
	@if { ! command -v slurmctld || ! command -v ip; } >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client iproute2 >/dev/null) \
		|| echo "warning: could not install slurm-wlm; SLURM launcher tests will skip"; fi

demo: $(STAMP)
	$(VENV)/bin/biobert demo --output-dir demo_out

test: $(STAMP) slurm
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf demo_out .pytest_cache
