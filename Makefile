# Two entry points, as in the README's Quick start: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test setup setup-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned: pip then takes the CPU build (a bare "torch" requirement could pull a CUDA build).
setup: $(BIN)/python
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[export,default-model]"

setup-test: setup
	$(BIN)/python -m pip install -q -e ".[export,default-model,test]"

demo: setup
	$(BIN)/stableembed demo

test: setup-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) artifacts .pytest_cache .hypothesis
