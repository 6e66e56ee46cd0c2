"""The CPU container image: its size and its cold start (container start to ``/ready``), with podman.

    python bench/image.py                   # builds the image (or reuses it), then 3 cold starts
    python bench/image.py --runs 5 --out /tmp/image.json

Writes bench/results/image-cpu.json: the image's size (and its base's, the virtual environment's and
torch's share), each cold start (to ``/health``: the process answers; to ``/ready``: the model is
loaded and the embedded Redis answers) and each stop (SIGTERM to exit, drained), with the machine.

The functions here are also what tests/deploy/test_image.py builds and runs the image with
(``bench.image``). They drive ``make image`` with what this machine needs, found on their own:
- the base: ``ATLAS_IMAGE_BASE``, else ``localhost/atlas-base:bookworm`` made from Debian's packages
  by deploy/local-base.sh (when mmdebstrap is installed: no registry needed), else the Dockerfile's
  python:3.11-slim-bookworm;
- the torch CPU wheel: ``ATLAS_TORCH_WHEELS`` (a folder), else one in pip's find-links, else PyTorch's
  CPU index (the Dockerfile's default);
- the CA bundle of a TLS-intercepting proxy: ``ATLAS_PIP_CA``, else pip's ``cert`` setting, passed
  as a build secret.
An image whose label ``atlas.inputs`` matches the hash of every build input is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
WORK = REPO / "build" / "image"
IMAGE = "localhost/atlas-serve:cpu"
LOCAL_BASE = "localhost/atlas-base:bookworm"
DEFAULT_BASE = "python:3.11-slim-bookworm"
INPUTS_LABEL = "atlas.inputs"
#: What `pip install .` reads inside the build (deploy/Dockerfile's COPY lines), with the Dockerfile.
BUILD_INPUTS = ("deploy/Dockerfile", "pyproject.toml", "README.md", "engine", "kernels", "server", "training",
                "clients")
#: podman's defaults ask for more open files and processes than some sandboxes allow (runc then
#: fails with "error setting rlimits"), and a pod's infra container takes no --ulimit flag: a
#: containers.conf (CONTAINERS_CONF) sets them for every container, the pod's included.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1000:1000"]

[engine]
cgroup_manager = "cgroupfs"
"""


def log(message: str) -> None:
    print(f"[image] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port nobody listens on right now (containers share the host's network here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def have_tools() -> str | None:
    """None when podman and buildah are installed, else why the image cannot be built here."""
    missing = [tool for tool in ("podman", "buildah") if shutil.which(tool) is None]
    return f"{' and '.join(missing)} not installed (apt-get install podman buildah)" if missing else None


# -- podman ---------------------------------------------------------------------------------------

def podman_env() -> dict[str, str]:
    conf = WORK / "containers.conf"
    if not conf.exists() or conf.read_text() != CONTAINERS_CONF:
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["podman", *args], capture_output=True, text=True, env=podman_env(), timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"podman {shlex.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def inspect(image: str) -> dict[str, Any] | None:
    r = podman("image", "inspect", image, check=False)
    return json.loads(r.stdout)[0] if r.returncode == 0 else None


def label(image: str, key: str) -> str | None:
    info = inspect(image)
    return (info.get("Labels") or {}).get(key) if info else None


def image_size(image: str) -> int:
    info = inspect(image)
    assert info is not None, f"no image {image}"
    return int(info["Size"])


# -- what the build takes ------------------------------------------------------------------------

def torch_pin() -> str:
    m = re.search(r"^TORCH_PIN\s*\?=\s*(\S+)", (REPO / "Makefile").read_text(), re.M)
    assert m, "Makefile has no TORCH_PIN"
    return m.group(1)


def base_image() -> str:
    """The base to build on; makes the Debian one when this machine can (mmdebstrap, no registry)."""
    if os.environ.get("ATLAS_IMAGE_BASE"):
        return os.environ["ATLAS_IMAGE_BASE"]
    if inspect(LOCAL_BASE) is not None:
        return LOCAL_BASE
    if shutil.which("mmdebstrap") is None:
        return DEFAULT_BASE
    log(f"making {LOCAL_BASE} from Debian's packages (deploy/local-base.sh)")
    subprocess.run([str(REPO / "deploy" / "local-base.sh"), LOCAL_BASE], check=True, env=podman_env(),
                   stdout=subprocess.DEVNULL, timeout=1200)
    return LOCAL_BASE


def pip_setting(name: str) -> list[str]:
    """The values of a pip setting (``find-links``, ``cert``) from its environment and its files."""
    values = os.environ.get(f"PIP_{name.upper().replace('-', '_')}", "").split()
    r = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.rsplit(".", 1)[-1] == name:
            values += value.strip().strip("'\"").split()
    return values


def torch_wheels(pin: str, python_tag: str = "cp311") -> Path | None:
    """A folder holding only the torch CPU wheel for the base's Python (3.11 on bookworm), linked
    from where pip finds it, or None (the build then uses PyTorch's CPU index). A folder of its own
    keeps the build context to that one file."""
    version = pin.split("==", 1)[1]
    folders = [os.environ["ATLAS_TORCH_WHEELS"]] if os.environ.get("ATLAS_TORCH_WHEELS") else []
    folders += [f.removeprefix("file://") for f in pip_setting("find-links")]
    for folder in map(Path, folders):
        found = sorted(folder.glob(f"torch-{version}+cpu-{python_tag}-{python_tag}-*linux*x86_64.whl"))
        if found:
            target = WORK / "wheels"
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            try:
                os.link(found[0], target / found[0].name)
            except OSError:  # another file system
                shutil.copy2(found[0], target / found[0].name)
            return target
    return None


def pip_ca() -> Path | None:
    for value in ([os.environ.get("ATLAS_PIP_CA", "")] + pip_setting("cert")):
        if value and Path(value).is_file():
            return Path(value)
    return None


def _digest_tree(h: Any, path: Path) -> None:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if "__pycache__" in f.parts or f.suffix == ".pyc":
            continue  # .dockerignore keeps them out of the context
        h.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")


def inputs_hash(settings: Mapping[str, str]) -> str:
    """Everything the image is made of: the build inputs' bytes and the make variables given (the
    base's image id stands for the base)."""
    h = hashlib.sha256()
    for rel in BUILD_INPUTS:
        _digest_tree(h, REPO / rel)
    h.update(json.dumps(dict(settings), sort_keys=True).encode())
    return h.hexdigest()[:24]


@dataclass
class Build:
    image: str
    built: bool  # False: an image with the same inputs was reused
    seconds: float
    settings: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)


def ensure_image(image: str = IMAGE, force: bool = False) -> Build:
    """Builds `image` with `make image` unless one with the same inputs exists."""
    base = base_image()
    if base != DEFAULT_BASE and inspect(base) is None:
        podman("pull", base, timeout=1200)
    wheels, ca = torch_wheels(torch_pin()), pip_ca()
    settings = {"IMAGE_ENGINE": "podman", "IMAGE": image, "PYTHON_IMAGE": base}
    if wheels is not None:
        settings["TORCH_WHEELS"] = str(wheels)
    if ca is not None:
        settings["PIP_CA"] = str(ca)
    base_info = inspect(base)
    digest = inputs_hash({**settings, "base_id": base_info["Id"] if base_info else base,
                          "wheels": " ".join(sorted(p.name for p in wheels.iterdir())) if wheels else ""})
    if not force and label(image, INPUTS_LABEL) == digest:
        return Build(image, False, 0.0, settings)
    # chroot isolation: the RUN steps need no user namespace, no cgroup and no network setup.
    settings["IMAGE_FLAGS"] = f"--isolation=chroot --label {INPUTS_LABEL}={digest}"
    command = ["make", "--no-print-directory", "image", *(f"{k}={v}" for k, v in settings.items())]
    log(f"building {image} (log: {(WORK / 'build.log').relative_to(REPO)}): {shlex.join(command)}")
    previous = inspect(image)
    WORK.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(WORK / "build.log", "w") as out:
        r = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=podman_env(),
                           timeout=3600)
    seconds = time.perf_counter() - start
    if r.returncode != 0:
        tail = (WORK / "build.log").read_text()[-4000:]
        raise RuntimeError(f"make image failed ({r.returncode}):\n{tail}")
    # The previous image of this tag is left untagged: drop it (disk). The build cache (the torch
    # layer above all) stays, so the next build after a source change reinstalls only the project.
    if previous is not None and previous["Id"] != (inspect(image) or {}).get("Id"):
        podman("rmi", previous["Id"], check=False)
    return Build(image, True, seconds, settings, command)


# -- containers ------------------------------------------------------------------------------------

#: Every container here runs on the host's network (no bridge, no port mapping): ATLAS_PORT picks
#: its port.
RUN_FLAGS = ("--network=host",)


@dataclass
class Container:
    """One ``podman run -d`` of the image, on the host's network at ``port``."""

    name: str
    image: str
    port: int
    env: dict[str, str] = field(default_factory=dict)
    volumes: list[str] = field(default_factory=list)  # podman -v values
    pod: str | None = None
    started_at: float = 0.0
    host: str = "127.0.0.1"  # a bridge network's address for containers started by podman-compose

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def run_args(self) -> list[str]:
        # A pod's containers take the pod's network (here the host's): no --network of their own.
        where = ["--pod", self.pod] if self.pod else list(RUN_FLAGS)
        args = ["run", "-d", "--name", self.name, *where, "-e", f"ATLAS_PORT={self.port}"]
        for k, v in self.env.items():
            args += ["-e", f"{k}={v}"]
        for v in self.volumes:
            args += ["-v", v]
        return [*args, self.image]

    def start(self) -> Container:
        self.started_at = time.perf_counter()
        podman(*self.run_args())
        return self

    def wait(self, path: str = "/ready", timeout_s: float = 180.0) -> float:
        """Seconds from `start` until `path` answers 200."""
        deadline = time.monotonic() + timeout_s
        polls, last = 0, "no answer"
        while time.monotonic() < deadline:
            try:
                r = httpx.get(self.url + path, timeout=2)
                if r.status_code == 200:
                    return time.perf_counter() - self.started_at
                last = f"{r.status_code} {r.text}"
            except httpx.HTTPError as e:
                last = repr(e)
            polls += 1
            if polls % 40 == 0 and not self.running():  # a podman call costs CPU: every ~2 s
                raise RuntimeError(f"{self.name} exited before {path}:\n{self.logs()}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: no {path} within {timeout_s} s (last: {last}):\n{self.logs()}")

    def running(self) -> bool:
        r = podman("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return r.stdout.strip() == "true"

    def stop(self, grace_s: int = 45) -> tuple[float, int]:
        """SIGTERM (the server drains), SIGKILL after `grace_s`: (seconds, exit code)."""
        start = time.perf_counter()
        podman("stop", "-t", str(grace_s), self.name, timeout=grace_s + 60)
        seconds = time.perf_counter() - start
        code = podman("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout.strip()
        return seconds, int(code)

    def logs(self) -> str:
        """The server's log without the access lines of the polls."""
        r = podman("logs", self.name, check=False)
        lines = [line for line in (r.stdout + r.stderr).splitlines() if '"GET /ready' not in line
                 and '"GET /health' not in line]
        return "\n".join(lines)[-6000:]

    def remove(self) -> None:
        # -v: the anonymous volume of the image's VOLUME too (a named one stays).
        podman("rm", "-f", "-v", "-t", "0", self.name, check=False)


def run_in(image: str, *command: str, entrypoint: str | None = None) -> str:
    """A one-off command in the image (stdout)."""
    args = ["run", "--rm", *RUN_FLAGS]
    if entrypoint is not None:
        args += ["--entrypoint", entrypoint]
    return podman(*args, image, *command).stdout


# -- the benchmark ---------------------------------------------------------------------------------

def cold_starts(image: str, runs: int) -> list[dict[str, float]]:
    """Each run: a new container on a new volume (nothing cached but the image's files)."""
    out = []
    for n in range(runs):
        name = f"atlas-bench-{os.getpid()}-{n}"
        c = Container(name, image, free_port(), env={"ATLAS_API_KEYS": "bench-key:bench"},
                      volumes=[f"{name}:/data"])
        try:
            c.start()
            health = c.wait("/health")
            ready = c.wait("/ready")
            stop_s, code = c.stop()
            out.append({"to_health_s": round(health, 2), "to_ready_s": round(ready, 2),
                        "stop_s": round(stop_s, 2), "exit_code": code})
            log(f"cold start {n + 1}/{runs}: /health {health:.2f} s, /ready {ready:.2f} s, "
                f"stop {stop_s:.2f} s")
        finally:
            c.remove()
            podman("volume", "rm", "-f", name, check=False)
    return out


def sizes(image: str, base: str) -> dict[str, Any]:
    """The image's size (uncompressed, as `podman images` shows it) and what makes it up."""
    info = inspect(image)
    assert info is not None
    # Two du calls: one call counts a folder once, under the first argument that holds it.
    du = run_in(image, "-c", "du -sb /opt/venv && du -sb /opt/venv/lib/python3.11/site-packages/torch",
                entrypoint="sh")
    venv, torch_dir = (int(line.split()[0]) for line in du.splitlines())
    return {"image_bytes": int(info["Size"]), "image_mb": round(int(info["Size"]) / 1e6),
            "base": base, "base_mb": round(image_size(base) / 1e6) if inspect(base) else None,
            "venv_mb": round(venv / 1e6), "torch_mb": round(torch_dir / 1e6),
            "layers": len(info.get("RootFS", {}).get("Layers", []))}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", default=IMAGE)
    p.add_argument("--runs", type=int, default=3, help="cold starts (each a new container and volume)")
    p.add_argument("--rebuild", action="store_true", help="build even when the inputs did not change")
    p.add_argument("--out", type=Path, default=RESULTS / "image-cpu.json")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    why = have_tools()
    if why:
        sys.exit(why)
    from atlas.engine.machine import describe_machine, load_average

    machine = describe_machine("cpu")
    build = ensure_image(args.image, force=args.rebuild)
    torch_inside = run_in(args.image, "-c", "import torch; print(torch.__version__)",
                          entrypoint="python").strip()
    runs = cold_starts(args.image, args.runs)
    machine["load_average_at_end"] = load_average()
    machine["note"] = "the containers ran on this machine (podman, host network, 2 noisy shared cores)"
    record = {
        "benchmark": "image",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "engine": podman("--version").stdout.strip(),
        "image": args.image,
        "build": {"settings": {k: Path(v).name if k in ("TORCH_WHEELS", "PIP_CA") else v
                               for k, v in build.settings.items() if k != "IMAGE_FLAGS"},
                  "built_now": build.built, "build_s": round(build.seconds, 1) if build.built else None,
                  "torch_in_image": torch_inside},
        "size": sizes(args.image, build.settings["PYTHON_IMAGE"]),
        "cold_start": {
            "what": "podman run -d (new container, new volume) until GET /ready answers 200: the bundled "
                    "model loaded and the embedded Redis answering",
            "runs": runs,
            "to_ready_median_s": round(statistics.median(r["to_ready_s"] for r in runs), 2),
            "to_health_median_s": round(statistics.median(r["to_health_s"] for r in runs), 2),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"size": record["size"], "cold_start": record["cold_start"]}, indent=2))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
