# el-fairseq: `make demo` (the main job) and `make test` on a fresh machine; both install first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.el-fairseq-installed
export PYTHONUNBUFFERED := 1

.PHONY: install test demo bench clean

install: $(STAMP)

# Re-runs only when the requirements or setup.py change: a second `make install` is a no-op.
$(STAMP): requirements.txt setup.py scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh
	touch $@

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m el_fairseq.demo --out results/demo

bench: install
	$(PY) -m benchmarks.loss_benchmark

clean:
	rm -rf $(VENV) results/demo .pytest_cache
