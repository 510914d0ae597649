# Two entry points for a fresh machine:
#   make run   - create the venv, install, and run the whole pipeline on params.yaml
#   make test  - create/reuse the venv and run lint, type check and the whole test suite
# Everything else (make ui, make smoke, make bench) is optional.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEV    := $(VENV)/.dev-stamp
PARAMS ?= params.yaml
FASHION_DIR := /usr/share/datasets/fashion-mnist

export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1

.PHONY: run test smoke ui data bench clean

# The install is a fifth of a fresh `make run`, so it is kept lean (benchmarks/results/install.md):
# - a current pip first: the venv's bundled pip resolves this project's ~250 packages in ~90 s, a current
#   one in ~30 s (an offline machine keeps the bundled one);
# - byte-compilation on both cores after the install instead of pip's one file at a time (`|| true`: a few
#   files in torch and whenever are written for newer Pythons, which pip skips as well);
# - `make run` installs the runtime only; `make test` adds the dev tools.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip || echo 'note: kept the bundled pip (no package index reachable)'
	$(BIN)/pip install -q --no-compile -e .
	$(BIN)/python -m compileall -q -q -j 0 $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') || true
	touch $(STAMP)

$(DEV): $(STAMP)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(DEV)

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

test: $(DEV) data
	$(BIN)/ruff check dsv tasks flows tests benchmarks
	$(BIN)/mypy dsv
	@# Three processes: each suite starts its own real Prefect server, and Prefect's event worker is
	@# process-global, so a second server in the same process would not see the first one's runs.
	$(BIN)/pytest tests --ignore=tests/integration --ignore=tests/faults
	$(BIN)/pytest tests/faults
	$(BIN)/pytest tests/integration

clean:
	rm -rf artifacts metrics .dsv mlflow.db mlartifacts
