PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install proto bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/downpour train --strategy single --dataset mnist --model mlp --epochs 1 --eval-every 200

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

proto: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt 'grpcio-tools>=1.85.1'
	$(PY) -m grpc_tools.protoc -I src --python_out=src --pyi_out=src --grpc_python_out=src src/downpour/transport/downpour.proto

bench: $(STAMP)
	$(PY) benchmarks/single.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
