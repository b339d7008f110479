# The two quick-start commands: `make demo` and `make test`.
# Everything installs into .venv through constraints.txt (torch==2.13.0, torchvision==0.28.0).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-quick flower-audit clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,flower,text]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gradleak demo --out runs/demo --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# A Flower federation audited live (docs/flower.md): 4 clients, 3 rounds, offline, a few minutes.
flower-audit: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) examples/flower_audit/run.py --out runs/flower-audit

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
