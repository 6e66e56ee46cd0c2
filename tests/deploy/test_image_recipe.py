"""The image recipe as text, in the fast suite (no engine needed): what `make image` runs, how the
proxy's CA reaches pip without landing in a layer, and that `make test` never builds an image.
tests/test_deploy_manifests.py checks the rest of the Dockerfiles (the two-step install, the user,
the HEALTHCHECK)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_deploy_manifests import DOCKERFILES, instructions, makefile_torch_pin

ROOT = Path(__file__).resolve().parents[2]


def make_n(*args: str) -> list[str]:
    """The commands `make -n` would run, as words (the engine named, so nothing is probed)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    r = subprocess.run(["make", "-n", "--no-print-directory", *args, "IMAGE_ENGINE=podman"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return shlex.split(r.stdout.replace("\\\n", " "))


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_the_proxy_ca_is_a_build_secret_never_a_layer(variant: str) -> None:
    steps = list(instructions(DOCKERFILES[variant]))
    for word, args in steps:
        if word == "RUN" and re.search(r"\bpip install\b", args):
            assert "--mount=type=secret,id=ca" in args, args  # every step that downloads
            assert "PIP_CERT=/run/secrets/ca" in args, args
        if word in ("ENV", "ARG", "COPY", "ADD"):
            assert not re.search(r"PIP_CERT|\.crt|\.pem|secrets", args), (word, args)


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_the_data_dir_is_a_volume(variant: str) -> None:
    steps = list(instructions(DOCKERFILES[variant]))
    runtime = steps[max(n for n, (word, _) in enumerate(steps) if word == "FROM"):]
    env = " ".join(a for word, a in runtime if word == "ENV")
    data_dir = re.search(r"ATLAS_DATA_DIR=(\S+)", env)
    assert data_dir, env
    volumes = [a for word, a in runtime if word == "VOLUME"]
    assert volumes == [f'["{data_dir.group(1)}"]'], volumes


def test_make_image_pins_the_makefiles_torch() -> None:
    words = make_n("image")
    assert words[:3] == ["podman", "build", "--format"]  # podman: docker format keeps HEALTHCHECK
    assert f"TORCH_PIN={makefile_torch_pin()}" in words
    assert "--build-context" not in words and "--secret" not in words  # the defaults: CPU index, no CA


def test_make_image_from_local_wheels_can_only_take_the_cpu_build(tmp_path: Path) -> None:
    words = make_n("image", f"TORCH_WHEELS={tmp_path}", f"PIP_CA={tmp_path}/ca.pem",
                   "PYTHON_IMAGE=localhost/base:1")
    # The +cpu label is on the local wheel only: PyPI's CUDA build of the same version never matches.
    assert f"TORCH_PIN={makefile_torch_pin()}+cpu" in words
    assert f"torch-wheels={tmp_path}" in words and "TORCH_INDEX=--find-links /wheels" in words
    assert f"id=ca,src={tmp_path}/ca.pem" in words
    assert "PYTHON_IMAGE=localhost/base:1" in words


def test_make_image_cuda_exists() -> None:
    words = make_n("image-cuda")
    assert words[words.index("-f") + 1] == "deploy/Dockerfile.cuda"
    assert f"TORCH_PIN={makefile_torch_pin()}" in words


def test_make_test_leaves_the_image_tests_out() -> None:
    make = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test:.*\n((?:\t.*\n)*)", make, re.M)
    assert recipe and "ATLAS_IMAGE_TESTS" not in recipe.group(1)
    assert re.search(r"^test-image:.*\n\tATLAS_IMAGE_TESTS=1 ", make, re.M)
