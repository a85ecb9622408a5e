# wanlora — set-up, tests and the demo. Each target creates .venv when it is missing.
# CUDA users: make test TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,bnb
PY := $(VENV)/bin/python
STAMP := $(VENV)/.wanlora-installed

.PHONY: install test demo clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: $(STAMP)
	$(PY) -m wanlora.tools.demo $(if $(DATA),--data "$(DATA)") $(if $(WORK),--work "$(WORK)")

clean-venv:
	rm -rf $(VENV)
