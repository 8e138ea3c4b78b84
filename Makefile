# The two commands a newcomer needs: `make serve` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
TINY   ?= models/tiny-llava
SHAPES ?= backend/shapes/model
HOST   ?= 127.0.0.1
PORT   ?= 9090

.PHONY: install serve test lint tiny-model bench demo quality clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: a range that admits newer releases would pull a multi-GB CUDA build on CPU machines.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

install: $(VENV)/.installed

$(TINY)/config.json: | $(VENV)/.installed
	$(BIN)/mllm-backend tiny-model $(TINY)

tiny-model: $(TINY)/config.json

# Serves MLLM_MODEL if set; otherwise the shipped shapes model (trained here on synthetic shapes: it knows only them).
serve: install
	@if [ -z "$$MLLM_MODEL" ]; then \
		echo "MLLM_MODEL is not set: serving the shapes model $(SHAPES) (it labels the shapes world, nothing else)."; \
		echo "For real images: MLLM_MODEL=Qwen/Qwen2.5-VL-7B-Instruct make serve (on a GPU)."; \
		MLLM_MODEL=$(SHAPES) $(BIN)/mllm-backend serve --host $(HOST) --port $(PORT); \
	else \
		$(BIN)/mllm-backend serve --host $(HOST) --port $(PORT); \
	fi

lint: install
	$(BIN)/ruff check backend tests
	$(BIN)/ruff format --check backend tests

test: install lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# The engine (tiny checkpoint), this backend against its peers (shapes model), through transformers serve, and
# 1 vs 2 pre-annotation workers (Redis, and a Label Studio installed on first use): bench-results/engine.json.
bench: install
	HF_HUB_OFFLINE=1 $(BIN)/mllm-backend bench --out bench-results/engine.json

# Label quality on a held-out shapes world (full size): quality-report/report.json, summary.md, plots.
quality: install
	HF_HUB_OFFLINE=1 $(BIN)/mllm-backend quality --out quality-report --tasks 300

# Offline demo: Label Studio + this backend + a sample project, until Ctrl-C.
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/mllm-backend demo

clean:
	rm -rf $(VENV) models .demo .pytest_cache .ruff_cache
