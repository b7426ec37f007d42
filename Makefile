# Two entry points on a fresh clone:
#   make run    virtual environment + picogpt, GPT-2 124M fetched and converted if missing, then generate
#   make test   virtual environment + picogpt with its test extras, then the whole pytest suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= Alan Turing theorized that computers would one day become very powerful, but even he could not imagine
N ?= 20
MODEL ?= 124M

.PHONY: run test bench install install-test clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# picogpt and the converter's TensorFlow (to fetch a missing model)
$(VENV)/.installed: $(VENV)/bin/python setup.cfg pyproject.toml
	$(PY) -m pip install --quiet -e '.[convert]'
	touch $@

# ... plus the test tools and the PyTorch reference (torch 2.13.0, the CPU wheel)
$(VENV)/.installed-test: $(VENV)/bin/python setup.cfg pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: $(VENV)/.installed
	$(PY) -m picogpt "$(PROMPT)" -n $(N) --model $(MODEL) --download

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

# picogpt against PyTorch on the same weights, 1 and 2 threads, and the memory-bandwidth floor (about 10 min)
bench: $(VENV)/.installed-test
	$(PY) tools/bench.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
