# The README's commands. `make run` serves the default tagger; `make test` runs the test suite.
# Both create (or update) the virtual environment first: a fresh clone needs nothing else.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PHOTOTAG_CHECKPOINT ?= checkpoints/default.safetensors
PHOTOTAG_HOST ?= $(or $(HOST),0.0.0.0)
PHOTOTAG_PORT ?= $(or $(PORT),8000)
export PHOTOTAG_CHECKPOINT PHOTOTAG_HOST PHOTOTAG_PORT
PYTEST_ARGS ?=

.PHONY: run test test-image lint format checkpoint clean bench bench-serve bench-train face-photos

run: $(VENV)/.stamp-run $(PHOTOTAG_CHECKPOINT)  ## serve on $PHOTOTAG_HOST:$PHOTOTAG_PORT (0.0.0.0:8000)
	$(BIN)/python -m app

test: $(VENV)/.stamp-dev face-photos  ## run the test suite (all but the Docker image replay)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Offline, the fetch fails and the test that reads the photos skips, saying so (CI requires them).
face-photos: $(VENV)/.stamp-dev  ## real photos of one person on different days (tools/face_photos.py)
	-$(BIN)/python tools/face_photos.py

test-image: $(VENV)/.stamp-dev  ## replay the Dockerfile's build and start outside Docker (minutes)
	$(BIN)/python -m pytest -m image_build $(PYTEST_ARGS)

lint: $(VENV)/.stamp-dev  ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.stamp-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: bench-serve  ## the serving benchmark (training benchmarks: see bench/README.md)

bench-serve: $(VENV)/.stamp-dev  ## phototag vs the tutorial reference server (needs wrk)
	$(BIN)/python bench/serve_bench.py

bench-train: $(VENV)/.stamp-dev  ## training img/s: model.train vs a plain loop, the image cache
	$(BIN)/python bench/train_speed.py

checkpoint: $(PHOTOTAG_CHECKPOINT)  ## build the default ImageNet checkpoint

$(PHOTOTAG_CHECKPOINT): | $(VENV)/.stamp-run
	$(BIN)/python -m model.pretrained --out $@

$(VENV)/.stamp-venv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	touch $@

$(VENV)/.stamp-run: pyproject.toml | $(VENV)/.stamp-venv
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.stamp-dev: pyproject.toml $(VENV)/.stamp-run
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
