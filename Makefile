# Two entry points a fresh machine needs: `make demo` and `make test`.
# Both create .venv when missing, install torch==2.13.0 first when torch is absent
# (a newer or unpinned torch pulls a multi-GB CUDA build), then the project.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hfs-installed
DEMO_DIR ?= runs/demo

.PHONY: test test-fast demo venv interop clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The inner loop: every test but the `slow` ones (process starts, several ranks, end-to-end commands).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	$(BIN)/python -m hfs.demo --out $(DEMO_DIR)

# mxnet 1.9.1 needs numpy<1.24, so the interoperability check lives in its own venv.
INTEROP_VENV ?= .venv-interop
interop:
	test -x $(INTEROP_VENV)/bin/python || $(PY) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/pip install -q "numpy<1.24" mxnet==1.9.1 pillow pyyaml pytest pytest-timeout
	PYTHONPATH=. $(INTEROP_VENV)/bin/python -m pytest -q -m interop tests/data/test_recordio_interop.py

clean:
	rm -rf $(VENV) $(INTEROP_VENV) runs
