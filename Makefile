# Two entry points (see README): `make demo` runs the main job, `make test` runs every test.
# Each creates .venv if needed and installs what it needs. torch is pinned to the 2.13.0 CPU
# wheel: an unpinned torch would pull gigabytes of CUDA packages.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
JOBS ?= 2

.PHONY: demo test install install-test build-ext clean

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.base: $(PY) setup.py constraints.txt
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -c constraints.txt numpy pillow safetensors tokenizers jinja2 tqdm setuptools wheel ninja
	$(PIP) install -q -c constraints.txt --no-build-isolation -e .
	touch $@

$(VENV)/.test: $(VENV)/.base requirements-test.txt constraints.txt
	$(PIP) install -q -c constraints.txt -r requirements-test.txt
	touch $@

install: $(VENV)/.base
install-test: $(VENV)/.test

demo: install
	$(PY) -m idefics3_kit.cli demo

test: install-test
	$(PY) -m pytest -n $(JOBS) -q tests

clean:
	rm -rf build *.egg-info idefics3_kit/*.so
