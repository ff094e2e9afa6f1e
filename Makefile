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

# The whole raw path: raw Criteo-format rows from the synthetic teacher -> convert (7 days:
# 6 train, the 7th halved into val and test) -> DLRM and DCN side by side -> the best of
# each exported for TF Serving under saved_models/<model>/<version>/ -> one prediction from
# the DLRM export, loaded by plain TensorFlow through its raw serving_default signature.
DEMO := runs/demo
$(DEMO)/raw/train.txt: | $(VENV)/.installed
	$(PY) -m tfdlrm generate --format kaggle --rows 350000 --table-rows 50000 --seed 0 --out $@ --overwrite

$(DEMO)/data/manifest.json: $(DEMO)/raw/train.txt
	$(PY) -m tfdlrm convert --input $< --format kaggle --halve-held-out --min-frequency 2 \
	    --out $(DEMO)/data --overwrite

demo: $(VENV)/.installed $(DEMO)/data/manifest.json
	$(PY) -m tfdlrm compare --models dlrm,dcn --data $(DEMO)/data --preset kaggle --epochs 1 \
	    --batch-size 256 --optimizers adagrad --lr 0.02 --out $(DEMO) --export
	$(PY) -m tools.predict_raw saved_models/dlrm $(DEMO)/raw/train.txt

# TEST_WORKERS=1 runs the suite in one process (plain `pytest` does too); the 25 slowest tests
# are listed at the end (the suite's budget: under 8 minutes of pytest on 2 cores).
TEST_WORKERS ?= 2
test: $(VENV)/.installed-test
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=25

clean:
	rm -rf runs .pytest_cache
