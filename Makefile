# Two entry points on a fresh clone:
#   make run    virtual environment + picogpt, then generate (GPT-2 124M if fetched, else the shipped demo model)
#   make test   virtual environment + picogpt with its test extras, then the whole pytest suite
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

# A variable as one shell word, exactly as the user gave it: `make run PROMPT='costs $HOME'` keeps
# $HOME and backquotes literal (make does not expand the value, the shell gets it in single quotes).
quote = '$(subst ','\'',$(value $(1)))'
# --option 'value' when the variable is set, nothing when it is empty
option = $(if $(value $(2)),$(1) $(call quote,$(2)))

.PHONY: run fetch test browser bench parity install install-convert install-test clean

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

install: $(VENV)/.installed
install-convert: $(VENV)/.installed-convert
install-test: $(VENV)/.installed-test

run: $(VENV)/.installed
	@$(PY) -m picogpt generate -n $(call quote,N) $(call option,--model,MODEL) \
		$(call option,--models-dir,MODELS_DIR) -- $(call quote,PROMPT)

# GPT-2 MODEL (124M, 355M, 774M or 1558M; default 124M) into the per-user models folder, or MODELS_DIR;
# BASE_URL names a mirror; DTYPE=bf16 stores the weights in bfloat16. A cut download resumes when the same
# command is run again.
fetch: $(VENV)/.installed-convert
	@$(PY) -m picogpt convert-tf --model-size $(if $(value MODEL),$(call quote,MODEL),124M) \
		$(call option,--models-dir,MODELS_DIR) $(call option,--base-url,BASE_URL) $(call option,--dtype,DTYPE)

test: $(VENV)/.installed-test browser
	$(PY) -m pytest -q

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
	$(PY) -m picogpt bench --corpus-docs $(call quote,CORPUS_DOCS)

# picogpt against PyTorch on MODEL's weights (default as for run), layer by layer; exit status 1 on a mismatch
parity: $(VENV)/.installed-parity
	$(PY) -m picogpt parity $(call option,--model,MODEL) $(call option,--models-dir,MODELS_DIR) -n $(call quote,N)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
