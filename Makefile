# Two entry points for a fresh machine:
#   make run   - create the venv, install, and run the whole pipeline on params.yaml
#   make test  - create/reuse the venv and run lint, type check and the whole test suite
# Everything else (make ui, make smoke, make bench) is optional.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PARAMS ?= params.yaml
FASHION_DIR := /usr/share/datasets/fashion-mnist

export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1

.PHONY: run test smoke ui data bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST: Debian/Ubuntu ship it as a package (no download); elsewhere the loader downloads it
# through torchvision when `prepare.download: true` (the default).
data:
	@if [ ! -d $(FASHION_DIR) ] && [ ! -d data/fashion_mnist ] && command -v apt-get >/dev/null 2>&1 \
	    && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) || \
	  echo "note: could not install dataset-fashion-mnist; the loader will try to download it"; \
	fi

run: $(STAMP) data
	$(BIN)/dsv run -p $(PARAMS)

smoke: $(STAMP) data
	$(BIN)/dsv run -p params.smoke.yaml

ui: $(STAMP)
	$(BIN)/dsv ui

test: $(STAMP) data
	$(BIN)/ruff check dsv tasks flows tests benchmarks
	$(BIN)/mypy dsv
	@# Three processes: each suite starts its own real Prefect server, and Prefect's event worker is
	@# process-global, so a second server in the same process would not see the first one's runs.
	$(BIN)/pytest tests --ignore=tests/integration --ignore=tests/faults
	$(BIN)/pytest tests/faults
	$(BIN)/pytest tests/integration

clean:
	rm -rf artifacts metrics .dsv mlflow.db mlartifacts
