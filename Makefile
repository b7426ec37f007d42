# Two entry points on a fresh clone:
#   make run    virtual environment + picogpt, then generate (GPT-2 124M if fetched, else the shipped demo model)
#   make test   virtual environment + picogpt with its test extras, then the whole pytest suite
# and for learning how GPT-2 computes:
#   make notebook  virtual environment + JupyterLab, then the walkthrough notebook (docs/walkthrough.ipynb)
# and the way from the demo model to GPT-2:
#   make fetch  download GPT-2 MODEL (default 124M) from OpenAI and convert it (installs TensorFlow first)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# pip says nothing but errors (-qq): a fresh `make run` prints only picogpt's notice and its text
PIP_INSTALL := $(PY) -m pip install --quiet --quiet
PROMPT ?= The optional argument
N ?= 20
MODEL ?=
MODELS_DIR ?=
BASE_URL ?=
DTYPE ?=

# What the user sets reaches the commands through the environment, byte for byte: `make run PROMPT='costs
# $HOME'` keeps $HOME, backquotes and line breaks literal. The shell expands "$$MAKE_PROMPT" once, as data,
# where a value written into the recipe would be read as shell code (a line break ended the command).
# $${MAKE_MODEL:+--model "$$MAKE_MODEL"} gives the option only when the variable is set.
run fetch bench parity: export MAKE_PROMPT = $(value PROMPT)
run fetch bench parity: export MAKE_N = $(value N)
run fetch bench parity: export MAKE_MODEL = $(value MODEL)
run fetch bench parity: export MAKE_MODELS_DIR = $(value MODELS_DIR)
run fetch bench parity: export MAKE_BASE_URL = $(value BASE_URL)
run fetch bench parity: export MAKE_DTYPE = $(value DTYPE)
run fetch bench parity: export MAKE_CORPUS_DOCS = $(value CORPUS_DOCS)
# picogpt leaves --download out of its hints under `make run`, which cannot pass it
run: export PICOGPT_MAKE_TARGET = run

.PHONY: run fetch test browser bench parity notebook install install-convert install-test install-notebook clean

$(VENV)/bin/python:
	@$(PYTHON) -m venv $(VENV)
	@$(PIP_INSTALL) --upgrade pip

# picogpt alone (fetching GPT-2 needs the converter's TensorFlow too: make fetch installs it)
$(VENV)/.installed: $(VENV)/bin/python setup.cfg pyproject.toml
	@$(PIP_INSTALL) -e .
	@touch $@

# ... plus TensorFlow, which reads OpenAI's checkpoints
$(VENV)/.installed-convert: $(VENV)/bin/python setup.cfg pyproject.toml
	@$(PIP_INSTALL) -e '.[convert]'
	@touch $@ $(VENV)/.installed

# ... plus the test tools and the PyTorch reference (torch 2.13.0, the CPU wheel); TensorFlow is among them
$(VENV)/.installed-test: $(VENV)/bin/python setup.cfg pyproject.toml
	@$(PIP_INSTALL) -e '.[test]'
	@touch $@ $(VENV)/.installed $(VENV)/.installed-convert

# ... plus PyTorch (torch 2.13.0, the CPU wheel) and transformers, for the parity check
$(VENV)/.installed-parity: $(VENV)/bin/python setup.cfg pyproject.toml
	@$(PIP_INSTALL) -e '.[parity]'
	@touch $@ $(VENV)/.installed

# ... plus JupyterLab and a kernel (and matplotlib, for the notebook's attention pictures)
$(VENV)/.installed-notebook: $(VENV)/bin/python setup.cfg pyproject.toml
	@$(PIP_INSTALL) -e '.[notebook]'
	@touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-convert: $(VENV)/.installed-convert
install-test: $(VENV)/.installed-test
install-notebook: $(VENV)/.installed-notebook

run: $(VENV)/.installed
	@$(PY) -m picogpt generate -n "$$MAKE_N" $${MAKE_MODEL:+--model "$$MAKE_MODEL"} \
		$${MAKE_MODELS_DIR:+--models-dir "$$MAKE_MODELS_DIR"} -- "$$MAKE_PROMPT"

# GPT-2 MODEL (124M, 355M, 774M or 1558M; default 124M) into the per-user models folder, or MODELS_DIR;
# BASE_URL names a mirror; DTYPE=bf16 or DTYPE=int8 stores the weight matrices in bfloat16 or int8. A cut
# download resumes when the same command is run again.
fetch: $(VENV)/.installed-convert
	@$(PY) -m picogpt convert-tf --model-size "$${MAKE_MODEL:-124M}" \
		$${MAKE_MODELS_DIR:+--models-dir "$$MAKE_MODELS_DIR"} $${MAKE_BASE_URL:+--base-url "$$MAKE_BASE_URL"} \
		$${MAKE_DTYPE:+--dtype "$$MAKE_DTYPE"}

test: $(VENV)/.installed-test browser
	$(PY) -m pytest -q

# The walkthrough, a notebook, in JupyterLab from the venv (its kernel is the venv's Python, which has picogpt).
# Run it top to bottom, change the prompt or the model and run it again; Ctrl-C here stops JupyterLab.
# As root (a container), JupyterLab refuses to start without --allow-root: given only there.
notebook: $(VENV)/.installed-notebook
	$(VENV)/bin/jupyter lab docs/walkthrough.ipynb $$(if [ "$$(id -u)" = 0 ]; then echo --allow-root; fi)

# The browser the page tests drive (tests/test_explain_browser.py): Debian's chromium and chromium-driver,
# installed with apt-get where it can be (as root, or with sudo that asks no password); elsewhere those
# tests skip, saying which packages they need.
BROWSER_PACKAGES := chromium chromium-driver fonts-dejavu-core
browser:
	@if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
		if [ "$$SUDO" = none ]; then \
			echo "make: the page tests need a browser: sudo apt-get install $(BROWSER_PACKAGES)"; \
		else \
			echo "make: installing $(BROWSER_PACKAGES) for the page tests (apt-get)"; \
			( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
				--no-install-recommends $(BROWSER_PACKAGES) ) >$(VENV)/apt.log 2>&1 \
				|| { tail -5 $(VENV)/apt.log; echo "make: apt-get failed; the page tests will skip"; }; \
		fi; \
	fi

# picogpt against PyTorch on the same weights, 1 and 2 threads, and the memory-bandwidth floor (about 3 min), then
# scoring 2000 documents in process, with PyTorch and on Ray (about 45 min on 2 cores; CORPUS_DOCS=0 skips it)
CORPUS_DOCS ?= 2000
bench: $(VENV)/.installed-test
	$(PY) -m picogpt bench --corpus-docs "$$MAKE_CORPUS_DOCS"

# picogpt against PyTorch on MODEL's weights (default as for run), layer by layer; exit status 1 on a mismatch
parity: $(VENV)/.installed-parity
	$(PY) -m picogpt parity $${MAKE_MODEL:+--model "$$MAKE_MODEL"} \
		$${MAKE_MODELS_DIR:+--models-dir "$$MAKE_MODELS_DIR"} -n "$$MAKE_N"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
