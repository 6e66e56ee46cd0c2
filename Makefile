# Two commands do everything on a fresh machine:
#   make serve   starts the server with its embedded defaults
#   make test    runs the test suite
# Outside an active virtual environment they make and use ./.venv (uv's when uv is present), because
# Debian's and Ubuntu's system Python refuse pip installs (PEP 668).
PYTHON ?= python3
TORCH_PIN ?= torch==2.13.0

ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.atlas-installed

.PHONY: install serve test test-fast lint lint-ruff lint-mypy bench clean-venv

$(PY):
	@if command -v uv >/dev/null 2>&1; then uv venv --seed -q "$(VENV)"; \
	else $(PYTHON) -m venv "$(VENV)" || { \
	  echo "could not make $(VENV): install python3-venv (apt install python3-venv) or uv"; exit 1; }; fi

# torch is installed first, pinned, so that no dependency range pulls a CUDA build.
$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	@$(PY) -m pip install -q -e ".[dev]"
	@touch "$(STAMP)"

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/atlas serve

lint: lint-ruff lint-mypy

lint-ruff: $(STAMP)
	$(PY) -m ruff check .

# mypy finds the `atlas.*` packages through links named as they install (pyproject.toml, [tool.mypy]).
lint-mypy: $(STAMP)
	@mkdir -p build/typing/atlas
	@for p in engine kernels server training; do ln -sfn ../../../$$p build/typing/atlas/$$p; done
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q

# The edit loop: everything but the tests marked slow (each over ~30 s).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) bench/ingest.py

clean-venv:
	rm -rf .venv
