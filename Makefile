# Two entry points on a fresh clone:
#   make run    virtual environment + picogpt, then generate (GPT-2 124M if fetched, else the shipped demo model)
#   make test   virtual environment + picogpt with its test extras, then the whole pytest suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= The optional argument
N ?= 20
MODEL ?=

.PHONY: run test bench parity install install-test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# picogpt alone (fetching GPT-2 needs the converter's TensorFlow too: pip install -e '.[convert]')
$(VENV)/.installed: $(VENV)/bin/python setup.cfg pyproject.toml
	$(PY) -m pip install --quiet -e .
	touch $@

# ... plus the test tools and the PyTorch reference (torch 2.13.0, the CPU wheel)
$(VENV)/.installed-test: $(VENV)/bin/python setup.cfg pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

# ... plus PyTorch (torch 2.13.0, the CPU wheel) and transformers, for the parity check
$(VENV)/.installed-parity: $(VENV)/bin/python setup.cfg pyproject.toml
	$(PY) -m pip install --quiet -e '.[parity]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: $(VENV)/.installed
	$(PY) -m picogpt "$(PROMPT)" -n $(N) $(if $(MODEL),--model $(MODEL))

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

# picogpt against PyTorch on the same weights, 1 and 2 threads, and the memory-bandwidth floor (about 3 min)
bench: $(VENV)/.installed-test
	$(PY) -m picogpt bench

# picogpt against PyTorch on MODEL's weights (default as for run), layer by layer; exit status 1 on a mismatch
parity: $(VENV)/.installed-parity
	$(PY) -m picogpt parity $(if $(MODEL),--model $(MODEL)) -n $(N)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
