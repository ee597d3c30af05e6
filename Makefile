# The two commands a new user needs (README.md): `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-test run evaluate finetune prune export test bench clean

# llama-cpp-python compiles llama.cpp the first time (6-8 min on 2 cores; pip caches the wheel)
$(VENV)/.core: pyproject.toml requirements/assets.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PY) -m pip install -q -e '.[export]'
	$(PY) -m pip install -q --no-deps -r requirements/assets.txt
	touch $@

$(VENV)/.test: $(VENV)/.core
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PY) -m pip install -q -e '.[test,export]'
	touch $@

setup: $(VENV)/.core
setup-test: $(VENV)/.test

# The default experiment (conf/experiment/default.yaml), then its table into RESULTS.md.
RUN_DIR ?= outputs/make-run/$(shell date +%Y-%m-%d_%H-%M-%S)
run: setup
	$(PY) experiments/pipeline.py hydra.run.dir=$(RUN_DIR) $(ARGS)
	$(PY) -m analysis.report $(RUN_DIR) --name make-run --archive results/make-run --note "The run: make run (conf/experiment/default.yaml); its wall time is in results.json." --by experiment,criterion,pruned_blocks,heal,quant --title "The default experiment (make run): SmolLM2-135M-Instruct, 20% PPL-pruned, LoRA-healed, Q8_0"

evaluate: setup
	$(PY) experiments/evaluate.py $(ARGS)

export: setup
	$(PY) experiments/export.py $(ARGS)

finetune: setup
	$(PY) experiments/finetune.py $(ARGS)

prune: setup
	$(PY) experiments/prune.py $(ARGS)

# Most tests compile and run on one core, so two workers halve the wall time on 2 cores; whole
# files go to one worker so that a file's module fixtures (a sweep, a trained run) run once.
TEST_WORKERS ?= 2
test: setup-test
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

bench: setup-test
	$(PY) benchmarks/bench_generate.py $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun
