PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint install proto bench clean browser

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,ray]'
	touch $(STAMP)

install: $(STAMP)

# The datasets beside the checkout when they are there; otherwise the user cache (downloaded, checksummed).
DATA_DIR ?= $(if $(wildcard ../shared/data/mnist),../shared/data,)
DATA_FLAG := $(if $(DATA_DIR),--data-dir $(DATA_DIR),)

demo: $(STAMP)
	$(VENV)/bin/downpour train --strategy downpour --workers 4 --servers 2 --dataset mnist $(DATA_FLAG) \
		--model mlp --optimizer adam --lr 0.001 --batch-size 32 --downpour.ema-decay 0.99 --downpour.evaluate-average \
		--epochs 1

test: $(STAMP) browser lint
	$(PY) -m pytest -q -p no:cacheprovider

# The unit tests and no real training run: a couple of seconds' check while developing.
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not integration"

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

# The report test renders report.html in headless Chromium; install Debian's
# package where apt-get works (as root), and carry on without it elsewhere
# (that one test then skips, saying why).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
		|| echo "note: Chromium not installed; the report-rendering test will skip"; }

proto: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt 'grpcio-tools>=1.85.1'
	$(PY) -m grpc_tools.protoc -I src --python_out=src --pyi_out=src --grpc_python_out=src src/downpour/transport/downpour.proto

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs build src/*.egg-info
