# The two commands a fresh machine needs: `make demo` and `make test`.
# Each creates .venv on first use and installs bncheck (editable) with what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.bncheck-installed

.PHONY: demo test test-slow test-zoo lint bench samples clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	@$(BIN)/python sample_models/demo.py

test: $(STAMP)
	$(BIN)/ruff check bncheck tests sample_models benchmarks
	$(BIN)/python -m pytest -q

# the slow sweeps, plus the tests that need ultralytics (installed here with torch/torchvision pinned)
test-slow: $(STAMP)
	$(BIN)/python -m pip freeze | grep -E '^(torch|torchvision)==' > $(VENV)/constraints.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c $(VENV)/constraints.txt 'ultralytics>=8.1'
	$(BIN)/python -m pytest -q -m slow

# Every torchvision/timm model with BN (~15-25 min on 2 cores); per-model overhead into benchmarks/zoo.md
test-zoo: $(STAMP)
	printf '| model | BN layers | input | floor | bncheck | ratio | max score | verdict |\n|---|---:|---|---:|---:|---:|---:|---|\n' > benchmarks/zoo.md
	BNCHECK_ZOO_RESULTS=benchmarks/zoo.md $(BIN)/python -m pytest -q -m zoo

lint: $(STAMP)
	$(BIN)/ruff check bncheck tests sample_models benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py --markdown benchmarks/RESULTS.md

samples: $(STAMP)
	$(BIN)/python sample_models/make_samples.py
	$(BIN)/python sample_models/make_segmentation.py

clean:
	rm -rf $(VENV) .bncheck .pytest_cache
