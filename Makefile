# Two commands do everything on a fresh machine:
#   make serve   starts the server with its embedded defaults
#   make test    runs the test suite
PYTHON ?= python3
TORCH_PIN ?= torch==2.13.0

.PHONY: install serve test lint bench

# torch is installed first, pinned, so that no dependency range pulls a CUDA build.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_PIN)"
	@$(PYTHON) -m pip install -q -e ".[dev]"

serve: install
	atlas serve

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) bench/ingest.py
