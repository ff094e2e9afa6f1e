# The two commands a fresh clone needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test install clean

# The pinned requirements, then tfdlrm itself in editable mode (pyproject.toml): the
# `tfdlrm` command in .venv/bin, and `import tfdlrm` from any directory.
$(VENV)/.installed: requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PIP) install -r requirements-test.txt
	@touch $@

install: $(VENV)/.installed

# Trains DLRM and DCN on built-in synthetic data, prints them side by side, and
# exports each for TF Serving under saved_models/<model>/<version>/.
demo: $(VENV)/.installed
	$(PY) -m tfdlrm compare --models dlrm,dcn --data synthetic --preset kaggle --rows 20000 \
	    --train-examples 300000 --eval-examples 50000 --epochs 1 --batch-size 256 \
	    --optimizers adagrad --lr 0.02 --out runs/demo --export

# TEST_WORKERS=1 runs the suite in one process (plain `pytest` does too).
TEST_WORKERS ?= 2
test: $(VENV)/.installed-test
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf runs .pytest_cache
