# el-fairseq: `make demo` (the main job) and `make test` on a fresh machine; both install first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.el-fairseq-installed
export PYTHONUNBUFFERED := 1

.PHONY: install test demo bench bench-compare gpu-check clean

install: $(STAMP)

# Re-runs only when the requirements or setup.py change: a second `make install` is a no-op.
$(STAMP): requirements.txt setup.py scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh
	touch $@

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m el_fairseq.pipeline.demo --out results/demo

bench: install
	$(PY) -m benchmarks.loss_benchmark
	$(PY) -m benchmarks.linear_benchmark
	$(PY) -m benchmarks.vocab_parallel_benchmark
	$(PY) -m benchmarks.compile_benchmark

# Is a change slower? The same two benchmarks for BASE (a revision) and this tree, alternating, in one run.
bench-compare: install
	$(PY) -m benchmarks.compare_revisions --base $(or $(BASE),$(error set BASE=<revision>, e.g. make bench-compare BASE=HEAD~1))

# On a machine with a CUDA GPU: its own CUDA torch (a venv that sees the system's packages; install.sh keeps
# an importable torch), then CUDA tests, the loss benchmark on the GPU and a short fp16 CE/EL training.
# GPU_CHECK_ARGS: e.g. --raw-dir DIR (Multi30k), --data DATA_BIN, --updates 300. See README "GPU check".
GPU_VENV ?= .venv-gpu
$(GPU_VENV)/.el-fairseq-installed: requirements.txt setup.py scripts/install.sh
	VENV=$(GPU_VENV) VENV_SYSTEM_SITE=1 bash scripts/install.sh
	touch $@

gpu-check: $(GPU_VENV)/.el-fairseq-installed
	$(GPU_VENV)/bin/python -m el_fairseq.pipeline.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(GPU_VENV) results/demo .pytest_cache
