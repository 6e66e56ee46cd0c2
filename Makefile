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

.PHONY: install serve test test-fast lint lint-ruff lint-mypy bench clean-venv image image-cuda test-image

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

# One worker per core, at most 4 (pytest-xdist; a test file stays on one worker, with its module's
# fixtures); tests/conftest.py shares the cores' threads among them. --durations: the slowest tests,
# printed with every run, to keep the suite within its 15 minutes. `$(PY) -m pytest` runs it serially.
PYTEST_PARALLEL := -n logical --maxprocesses 4 --dist loadfile

test: lint
	$(PY) -m pytest -q $(PYTEST_PARALLEL) --durations=15

# The edit loop: everything but the tests marked slow (each over ~30 s).
test-fast: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_PARALLEL) -m "not slow"

bench: $(STAMP)
	$(PY) bench/ingest.py

clean-venv:
	rm -rf .venv

# -- container images (docs/deploy.md, "Build the images") ----------------------------------------
# docker when its daemon answers, else podman (no daemon needed); IMAGE_ENGINE=... to choose.
ifeq ($(origin IMAGE_ENGINE),undefined)
IMAGE_ENGINE = $(shell if docker info >/dev/null 2>&1; then echo docker; \
	elif command -v podman >/dev/null 2>&1; then echo podman; else echo docker; fi)
endif
IMAGE ?= atlas-serve:cpu
IMAGE_CUDA ?= atlas-serve:cuda
# The base: empty keeps the Dockerfile's (python:3.11-slim-bookworm; nvidia/cuda for image-cuda).
PYTHON_IMAGE ?=
CUDA_IMAGE ?=
# A folder holding the torch CPU wheel (offline builds): torch is installed from it, pinned with the
# `+cpu` label only that wheel carries, so PyPI's CUDA build of the same version can never be taken.
TORCH_WHEELS ?=
# The CA bundle of a TLS-intercepting proxy: a build secret, used by pip and never stored in a layer.
PIP_CA ?=
# More build flags (podman without a daemon's privileges: --isolation=chroot).
IMAGE_FLAGS ?=
comma := ,
# podman (buildah) writes OCI images by default, which have no HEALTHCHECK; Docker's format keeps it.
IMAGE_BUILD = $(IMAGE_ENGINE) build $(if $(findstring podman,$(IMAGE_ENGINE)),--format docker) \
	$(if $(PIP_CA),--secret id=ca$(comma)src=$(PIP_CA)) $(IMAGE_FLAGS)
IMAGE_TORCH = $(if $(TORCH_WHEELS),--build-context torch-wheels=$(TORCH_WHEELS) \
	--build-arg TORCH_PIN=$(TORCH_PIN)+cpu --build-arg "TORCH_INDEX=--find-links /wheels", \
	--build-arg TORCH_PIN=$(TORCH_PIN))
IMAGE_SIZE = $(IMAGE_ENGINE) image inspect --format '{{.Size}}'

# The CPU image: torch pinned first, then the project (the two steps of `make install`).
image:
	$(IMAGE_BUILD) -f deploy/Dockerfile -t $(IMAGE) $(IMAGE_TORCH) \
	  $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) .
	@$(IMAGE_SIZE) $(IMAGE) | awk '{printf "$(IMAGE): %.0f MB\n", $$1 / 1e6}'

# The CUDA image (nvidia/cuda base, torch from the CUDA 12.8 index); never built on the CPU-only CI.
image-cuda:
	$(IMAGE_BUILD) -f deploy/Dockerfile.cuda -t $(IMAGE_CUDA) --build-arg TORCH_PIN=$(TORCH_PIN) \
	  $(if $(CUDA_IMAGE),--build-arg CUDA_IMAGE=$(CUDA_IMAGE)) .
	@$(IMAGE_SIZE) $(IMAGE_CUDA) | awk '{printf "$(IMAGE_CUDA): %.0f MB\n", $$1 / 1e6}'

# Builds the CPU image (or reuses it) with podman and runs it: not part of `make test` (minutes, and
# it needs podman and buildah). tests/deploy/test_image.py says what it checks.
test-image: $(STAMP)
	ATLAS_IMAGE_TESTS=1 $(PY) -m pytest -q -m slow tests/deploy
