"""The CPU image, built and run with podman (no Docker daemon): `make test-image`, never `make test`.

The image is built with `make image` (bench/image.py finds what this machine needs: a Debian base
made by deploy/local-base.sh, the local torch CPU wheel, the proxy's CA as a build secret), or
reused when one with the same inputs exists. Then, on the host's network:
- one container with a named volume for the embedded store: cold start to /ready, its HEALTHCHECK,
  an ingest and a question (the bundled model finds a pass key, greedy, exactly as this checkout's
  engine does), the official `openai` client on the same session, and a new container on the same
  volume that still has the session and answers the same;
- the compose file's shape as a podman pod on the host's network: its Redis (Debian's redis-server
  with the compose file's arguments) and two replicas with the compose file's environment; a
  session written on one replica is read and continued on the other, and answers the same;
- the compose file itself with podman-compose (1.1 or newer), Redis and the two replicas on a
  compose network (the Redis image replaced, nginx left out), a session written on one replica and
  read on the other.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from atlas.training.tasks import PASSKEY_QUESTION, passkey
from bench import image as img

from .timings import TIMINGS, timed

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(3600),  # a first build downloads the dependencies (minutes)
    pytest.mark.skipif(os.environ.get("ATLAS_IMAGE_TESTS") != "1",
                       reason="builds and runs the container image (minutes): run `make test-image`"),
    pytest.mark.skipif(img.have_tools() is not None, reason=f"no image tools: {img.have_tools()}"),
]

ROOT = Path(__file__).resolve().parents[2]
KEY = "sk-image-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_TOKENS = 8
RUN_ID = f"{os.getpid()}"


# -- HTTP ------------------------------------------------------------------------------------------

def events(r: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def create(url: str) -> str:
    r = httpx.post(url + "/v1/sessions", headers=AUTH, timeout=30)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def ingest(url: str, sid: str, body: bytes, offset: int = 0) -> dict[str, Any]:
    with httpx.stream("POST", f"{url}/v1/sessions/{sid}/ingest", params={"offset": offset}, content=body,
                      headers={**AUTH, "Content-Type": "text/plain"}, timeout=120) as r:
        assert r.status_code == 200, r.read().decode()
        done = events(r)[-1]
    assert done.get("done") is True, done
    return done


def ask(url: str, sid: str, prompt: str) -> str:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/sessions/{sid}/generate", json=body, headers=AUTH, timeout=120) as r:
        assert r.status_code == 200, r.read().decode()
        evs = events(r)
    assert evs[-1].get("done") is True, evs[-1]
    return "".join(e["text"] for e in evs[:-1])


def session(url: str, sid: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/sessions/{sid}", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


# -- fixtures --------------------------------------------------------------------------------------

@dataclass
class Reference:
    """A pass-key document and what this checkout's engine answers after reading it (greedy)."""

    document: bytes
    key: str
    answer: str


@pytest.fixture(scope="module")
def reference() -> Reference:
    from atlas.engine import Atlas, SamplingParams

    sample = passkey(random.Random(0), 2048)
    assert sample.prompt.endswith(PASSKEY_QUESTION)
    document = sample.prompt[: -len(PASSKEY_QUESTION)]
    atlas = Atlas.load()  # the bundled model, as the image serves it
    state, _ = atlas.feed(atlas.new_state(), atlas.encode(document))
    gen = atlas.generate(state, PASSKEY_QUESTION, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    return Reference(document.encode(), sample.value, "".join(t.text for t in gen))


@pytest.fixture(scope="module")
def image() -> str:
    build = img.ensure_image(img.IMAGE)
    TIMINGS["build: make image"] = round(build.seconds, 2) if build.built else "reused (same inputs)"
    TIMINGS["image size"] = f"{img.image_size(build.image) / 1e6:.0f} MB"
    return build.image


@pytest.fixture(scope="module")
def volume() -> Iterator[str]:
    name = f"atlas-test-data-{RUN_ID}"
    img.podman("volume", "create", name)
    yield name
    img.podman("volume", "rm", "-f", name, check=False)


@pytest.fixture(scope="module")
def container(image: str, volume: str) -> Iterator[img.Container]:
    c = img.Container(f"atlas-test-{RUN_ID}", image, img.free_port(), env={"ATLAS_API_KEYS": f"{KEY}:acme"},
                      volumes=[f"{volume}:/data"])
    try:
        c.start()
        TIMINGS["cold start: podman run to /health"] = round(c.wait("/health"), 2)
        TIMINGS["cold start: podman run to /ready"] = round(c.wait("/ready"), 2)
        yield c
    finally:
        c.remove()


@dataclass
class Served:
    sid: str
    answer: str


@pytest.fixture(scope="module")
def served(container: img.Container, reference: Reference) -> Served:
    sid = create(container.url)
    with timed(f"ingest {len(reference.document)} bytes"):
        done = ingest(container.url, sid, reference.document)
    assert done["bytes_committed"] == len(reference.document)
    with timed(f"ask ({MAX_TOKENS} tokens)"):
        answer = ask(container.url, sid, PASSKEY_QUESTION)
    return Served(sid, answer)


# -- one container ---------------------------------------------------------------------------------

def test_image_is_what_the_dockerfile_says(image: str) -> None:
    info = img.inspect(image)
    assert info is not None
    config = info["Config"]
    health = info.get("Healthcheck") or config.get("Healthcheck")  # podman's place, Docker's place
    assert config["User"] == "10001:10001"  # non-root, numeric
    assert config["Entrypoint"] == ["atlas"] and config["Cmd"] == ["serve"]
    assert "/data" in config["Volumes"]  # the embedded store's AOF
    assert "ATLAS_DATA_DIR=/data" in config["Env"] and "ATLAS_HOST=0.0.0.0" in config["Env"]
    # podman keeps the HEALTHCHECK only in the docker format (`make image` asks for it).
    assert health and "/health" in " ".join(health["Test"])
    out = img.run_in(image, "-c", "import torch; print(torch.__version__, torch.version.cuda)",
                     entrypoint="python")
    version, cuda = out.split()
    assert version == img.torch_pin().split("==")[1] + "+cpu" and cuda == "None", out


def test_container_serves_the_bundled_model(container: img.Container) -> None:
    with timed("podman healthcheck run"):
        r = img.podman("healthcheck", "run", container.name, check=False)
    assert r.returncode == 0, r.stdout + r.stderr + container.logs()
    models = httpx.get(container.url + "/v1/models", headers=AUTH, timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["atlas-demo"]
    # Keys are required on 0.0.0.0: without one, only the probes answer.
    assert httpx.get(container.url + "/v1/models", timeout=30).status_code == 401


def test_ingest_and_ask(served: Served, reference: Reference) -> None:
    assert served.answer == reference.answer
    assert served.answer.startswith(f" {reference.key}"), (served.answer, reference.key)


def test_the_openai_client(container: img.Container, served: Served) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=container.url + "/v1", api_key=KEY)
    with timed("openai client: streamed completion"):
        chunks = list(client.completions.create(
            model="atlas-demo", prompt=PASSKEY_QUESTION, max_tokens=MAX_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"session_id": served.sid}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == served.answer
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == MAX_TOKENS


def test_a_new_container_on_the_volume_keeps_the_session(container: img.Container, served: Served,
                                                         reference: Reference) -> None:
    before = session(container.url, served.sid)
    with timed("stop (SIGTERM, drain)"):
        _, code = container.stop()
    assert code in (0, 143), container.logs()  # drained: 0, or SIGTERM re-raised (128 + 15)
    container.remove()
    container.start()  # a new container, same name, port and volume
    TIMINGS["restart: podman run to /ready"] = round(container.wait("/ready"), 2)
    after = session(container.url, served.sid)
    assert (after["tokens"], after["bytes_committed"]) == (before["tokens"], before["bytes_committed"])
    assert after["bytes_committed"] == len(reference.document)
    assert ask(container.url, served.sid, PASSKEY_QUESTION) == served.answer


# -- the compose file's shape: Redis and two replicas, in a pod -----------------------------------

def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text()))


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${NAME}``, ``${NAME:-default}`` and ``${NAME:?error}`` with `env` alone."""
    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if env.get(name):
            return env[name]
        assert op != ":?", f"compose needs {name}: {arg}"
        return arg if op == ":-" else ""
    return re.sub(r"\$\{(\w+)(:-|:\?)?([^}]*)\}", one, value)


def redis_image(base: str) -> str:
    """Debian's redis-server on the server image's base (no registry: redis:7.4-alpine cannot be
    pulled here), rebuilt when its Containerfile or the base changes."""
    name = "localhost/atlas-redis:test"
    containerfile = Path(__file__).with_name("Containerfile.redis")
    base_info = img.inspect(base)
    digest = hashlib.sha256(containerfile.read_bytes() + str(base_info and base_info["Id"]).encode()
                                ).hexdigest()[:24]
    if img.label(name, img.INPUTS_LABEL) != digest:
        with timed("build the Redis image"):
            img.podman("build", "--isolation=chroot", "--format", "docker", "-f", str(containerfile),
                       "--build-arg", f"BASE={base}", "--label", f"{img.INPUTS_LABEL}={digest}", "-t", name,
                       str(containerfile.parent), timeout=1200)
    return name


def wait_redis(name: str, port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = img.podman("exec", name, "redis-cli", "-p", str(port), "ping", check=False)
        if r.stdout.strip() == "PONG":
            return
        time.sleep(0.5)
    raise TimeoutError(img.podman("logs", name, check=False).stderr)


@pytest.fixture(scope="module")
def pod(image: str) -> Iterator[tuple[img.Container, img.Container]]:
    spec = compose()["services"]
    pod_name = f"atlas-compose-{RUN_ID}"
    redis_port = img.free_port()
    redis_name, redis_volume = f"{pod_name}-redis", f"{pod_name}-redis-data"
    # The compose file's Redis arguments (AOF, noeviction); compose's network alias `redis` is
    # loopback in a pod on the host's network.
    redis_args = [*spec["redis"]["command"], "--port", str(redis_port), "--bind", "127.0.0.1",
                  "--dir", "/data"]
    given = {"ATLAS_API_KEYS": f"{KEY}:acme"}  # what `docker compose up` takes from the shell
    env = {k: interpolate(str(v), given) for k, v in spec["atlas"]["environment"].items()}
    assert env["ATLAS_REDIS_URL"].startswith("redis://redis:6379/")
    env.update(ATLAS_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
               ATLAS_TORCH_THREADS="1")  # two replicas share two cores
    env.pop("ATLAS_PORT")  # each replica its own (Container sets it)
    replicas = [img.Container(f"{pod_name}-atlas-{n}", image, img.free_port(), env=env, pod=pod_name)
                for n in (1, 2)]
    assert spec["atlas"]["deploy"]["replicas"] == len(replicas)
    try:
        redis = redis_image(img.base_image())
        img.podman("pod", "create", "--network", "host", "--name", pod_name)
        img.podman("run", "-d", "--name", redis_name, "--pod", pod_name, "-v", f"{redis_volume}:/data",
                   redis, *redis_args)
        wait_redis(redis_name, redis_port)
        with timed("compose shape: two replicas to /ready"):
            for r in replicas:
                r.start()
            for r in replicas:
                r.wait("/ready")
        yield replicas[0], replicas[1]
    finally:
        for r in replicas:
            r.remove()
        img.podman("pod", "rm", "-f", "-t", "0", pod_name, check=False)
        img.podman("volume", "rm", "-f", redis_volume, check=False)


def test_compose_shape_any_replica_serves_any_session(pod: tuple[img.Container, img.Container],
                                                      reference: Reference) -> None:
    a, b = pod
    doc, half = reference.document, len(reference.document) // 2
    sid = create(a.url)
    with timed("compose shape: ingest on one replica, continue on the other"):
        ingest(a.url, sid, doc[:half])
        assert session(b.url, sid)["bytes_committed"] == half  # written on A, read on B
        ingest(b.url, sid, doc[half:], offset=half)  # continued on B
    assert session(a.url, sid)["bytes_committed"] == len(doc)
    # The same answer as one process that read the whole document, on either replica.
    assert ask(a.url, sid, PASSKEY_QUESTION) == reference.answer
    assert ask(b.url, sid, PASSKEY_QUESTION) == reference.answer


# -- the compose file itself, with podman-compose ------------------------------------------------

def podman_compose() -> str | None:
    """Why podman-compose cannot run the compose file here, or None. 1.0.x (Debian 12's) fails on
    the second replica ("unknown healthcheck test type": it edits the service's healthcheck in
    place while starting the first)."""
    exe = shutil.which("podman-compose")
    if exe is None:
        return "podman-compose is not installed (pip install 'podman-compose>=1.1')"
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, env=img.podman_env(), timeout=60)
    m = re.search(r"podman-compose version (\d+)\.(\d+)", r.stdout + r.stderr)
    if not m or (int(m.group(1)), int(m.group(2))) < (1, 1):
        return f"podman-compose 1.1 or newer is needed, found {(m and m.group(0)) or r.stdout.strip()!r}"
    return None


@pytest.fixture(scope="module")
def compose_replicas(image: str, tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[tuple[img.Container, img.Container]]:
    why = podman_compose()
    if why:
        pytest.skip(why)
    project = f"atlas-test-{RUN_ID}"
    # Only the Redis image is replaced (no registry here); nginx is left out: Debian's 1.22 lacks
    # the `resolve` the compose file's nginx 1.28 uses.
    override = tmp_path_factory.mktemp("compose") / "override.yml"
    override.write_text(f"services:\n  redis:\n    image: {redis_image(img.base_image())}\n")
    command = ["podman-compose", "-p", project, "-f", str(ROOT / "deploy" / "docker-compose.yml"),
               "-f", str(override)]
    env = {**img.podman_env(), "ATLAS_API_KEYS": f"{KEY}:acme", "ATLAS_IMAGE": image}
    try:
        start = time.perf_counter()
        r = subprocess.run([*command, "up", "-d", "atlas", "redis"], capture_output=True, text=True, env=env,
                           timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        replicas = []
        for n in (1, 2):  # deploy.replicas: 2
            name = f"{project}_atlas_{n}"
            address = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
            host = img.podman("inspect", "--format", address, name).stdout.strip()
            replicas.append(img.Container(name, image, 8000, host=host, started_at=start))
        for c in replicas:
            c.wait("/ready")
        TIMINGS["podman-compose: up to both replicas /ready"] = round(time.perf_counter() - start, 2)
        yield replicas[0], replicas[1]
    finally:
        ids = img.podman("ps", "-a", "-q", "--filter", f"label=io.podman.compose.project={project}",
                         check=False).stdout.split()
        if ids:  # -v: their anonymous /data volumes too
            img.podman("rm", "-f", "-v", "-t", "0", *ids, check=False)
        subprocess.run([*command, "down", "-v"], capture_output=True, env=env, timeout=300)


def test_compose_file_with_podman_compose(compose_replicas: tuple[img.Container, img.Container],
                                          reference: Reference) -> None:
    """deploy/docker-compose.yml as written (the Redis image aside): two replicas that find Redis
    by its service name on the compose network; a session written on one is read on the other."""
    a, b = compose_replicas
    doc = reference.document
    sid = create(b.url)
    ingest(b.url, sid, doc)
    assert session(a.url, sid)["bytes_committed"] == len(doc)
    assert ask(a.url, sid, PASSKEY_QUESTION) == reference.answer
