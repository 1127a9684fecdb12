# `make demo` and `make test` are the two commands a newcomer runs; both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch (a local file on our machines); GPU users: see README.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" numpy
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -e ".[dev,train,video,demo,serve]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m llava_voco.demo

test: venv
	$(PY) -m pytest tests -q

clean:
	rm -rf $(VENV) build *.egg-info
