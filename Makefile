# catdog: `make demo` and `make test` work on a fresh clone; both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The data: ./data/dogs-vs-cats, or else the shared copy beside the clone (as on the project's machines and CI).
DATA ?= $(firstword $(wildcard data/dogs-vs-cats ../shared/data/dogs-vs-cats) data/dogs-vs-cats)
RUN ?= runs/demo
# The torch and torchvision wheels this project is tested with (pip finds them on this machine's disk).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test browser-deps postgres-deps benchmarks clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[all,dev]'
	touch $@

demo: setup
	@if [ ! -e "$(DATA)" ]; then \
	  echo "No data at $(DATA)."; \
	  echo "Get Kaggle's Dogs vs. Cats data: download train.zip (and test1.zip) from"; \
	  echo "  https://www.kaggle.com/c/dogs-vs-cats/data  (or: kaggle competitions download -c dogs-vs-cats)"; \
	  echo "then unpack so that $(DATA)/train/cat.0.jpg and $(DATA)/test1/1.jpg exist:"; \
	  echo "  mkdir -p $(DATA) && unzip train.zip -d $(DATA) && unzip test1.zip -d $(DATA)"; \
	  echo "or point DATA at any labelled image folder: make demo DATA=path/to/folder"; \
	  exit 2; \
	fi
	$(BIN)/python -m catdog.training.demo --data "$(DATA)" --run "$(RUN)"

browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "could not install chromium; the browser test will be skipped"; \
	  else echo "chromium is missing and we are not root; the browser test will be skipped"; fi; }

# The shared-tuning test runs two workers on a throwaway PostgreSQL cluster; it skips when the server is missing.
postgres-deps:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) || echo "could not install postgresql; the shared-tuning test will be skipped"; \
	  else echo "postgresql is missing and we are not root; the shared-tuning test will be skipped"; fi; }

test: setup browser-deps postgres-deps
	$(BIN)/python -m pytest -q

benchmarks: setup
	$(BIN)/python benchmarks/accuracy_vs_time.py
	$(BIN)/python benchmarks/predict_throughput.py
	$(BIN)/python benchmarks/serve_load.py

clean:
	rm -rf $(VENV) runs .pytest_cache
