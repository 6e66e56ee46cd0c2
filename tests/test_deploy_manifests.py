"""deploy/ without a Docker engine or a cluster: every file checked by a standard validator where one
exists offline, and by the properties the deployment relies on.

Validators: the compose-spec JSON schema vendored by ``check-jsonschema`` (and ``docker compose
config`` when the Compose plugin is installed); the Kubernetes OpenAPI schemas bundled in
``kubernetes-validate``, strict (unknown fields fail), for the oldest and the newest Kubernetes
version checked; ``kubectl kustomize`` (offline) renders the overlays when kubectl is installed;
``nginx -t`` checks the load balancer's config when nginx is installed. Dockerfiles have no offline
linter here: their steps are parsed and compared with the Makefile's.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILES = {"cpu": DEPLOY / "Dockerfile", "cuda": DEPLOY / "Dockerfile.cuda"}
#: The oldest Kubernetes the manifests support (the newest is the latest schema kubernetes-validate ships).
K8S_OLDEST = "1.27"
ATLAS_VAR = re.compile(r"\bATLAS_[A-Z0-9_]+\b")
#: Variables of the compose file itself (image and published port), not server settings.
COMPOSE_ONLY = {"ATLAS_IMAGE", "ATLAS_PUBLIC_PORT"}


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def settings_names() -> set[str]:
    """Every ATLAS_* variable the server, the store, the runtime and the kernels read."""
    from atlas.engine.runtime.settings import RuntimeSettings
    from atlas.engine.store.settings import StoreSettings
    from atlas.engine.threads import ThreadSettings
    from atlas.kernels.settings import KernelSettings
    from atlas.server.settings import ServerSettings

    classes = (ServerSettings, StoreSettings, RuntimeSettings, KernelSettings, ThreadSettings)
    return {f"ATLAS_{name.upper()}" for cls in classes for name in cls.model_fields}


def seconds(value: str | int | float) -> float:
    """Compose / nginx durations: 45s, 1m30s, 3600s, 1h, or a bare number of seconds."""
    if isinstance(value, int | float):
        return float(value)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|)", value.strip())
    assert parts, f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


# -- docker compose ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_matches_the_compose_spec_schema() -> None:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema is not installed (dev extra)")
    r = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                        str(COMPOSE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_docker_compose_config() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker CLI is not installed")
    if subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    r = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True,
                       text=True, env={**os.environ, "ATLAS_API_KEYS": "key:tenant"}, timeout=60)
    assert r.returncode == 0, r.stderr


def test_compose_two_replicas_on_redis_with_aof_behind_nginx(compose: dict[str, Any]) -> None:
    services = compose["services"]
    atlas, redis, lb = services["atlas"], services["redis"], services["lb"]
    assert atlas["deploy"]["replicas"] == 2
    assert atlas["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / atlas["build"]["context"] / atlas["build"]["dockerfile"]).resolve() == DOCKERFILES["cpu"]
    env = atlas["environment"]
    assert env["ATLAS_REDIS_URL"].startswith("redis://redis:")
    assert "ATLAS_API_KEYS" in env  # a server on 0.0.0.0 answers only with keys
    assert set(atlas["depends_on"]) == {"redis"}
    # The drain finishes before Docker's SIGKILL.
    assert seconds(atlas["stop_grace_period"]) > float(env["ATLAS_DRAIN_TIMEOUT_S"])
    assert "/health" in " ".join(atlas["healthcheck"]["test"])
    assert "ports" not in atlas, "replicas are reached through the load balancer only"

    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    volume, _, mount = redis["volumes"][0].partition(":")
    assert mount == "/data" and volume in compose["volumes"]

    assert lb["image"].startswith("nginx")
    conf_mounts = [v for v in lb["volumes"] if v.split(":")[1] == "/etc/nginx/nginx.conf"]
    assert conf_mounts and (DEPLOY / conf_mounts[0].split(":")[0]).resolve() == DEPLOY / "nginx.conf"
    assert lb["ports"]


def nginx_directives(conf: str) -> dict[str, list[str]]:
    """``name -> [value, ...]`` of every simple directive (comments removed)."""
    out: dict[str, list[str]] = {}
    for statement in re.split(r"[;{}]", re.sub(r"#[^\n]*", "", conf)):
        words = statement.split()
        if words:
            out.setdefault(words[0], []).append(" ".join(words[1:]))
    return out


def test_nginx_streams_both_ways() -> None:
    conf = (DEPLOY / "nginx.conf").read_text()
    d = nginx_directives(conf)
    assert d["proxy_buffering"] == ["off"]  # SSE events go out as produced
    assert d["proxy_request_buffering"] == ["off"]  # ingest bodies stream through, chunked
    assert d["proxy_http_version"] == ["1.1"]  # chunked upstream bodies need HTTP/1.1
    size = d["client_max_body_size"][0]
    assert size == "0" or (size[-1] in "gG" and int(size[:-1]) >= 1)
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        assert seconds(d[name][0]) >= 600, name
    assert any(v.startswith("atlas:8000") for v in d["server"]), d["server"]
    assert d["proxy_pass"] == ["http://atlas"]


def test_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    """``nginx -t`` on the config, with the compose service name and Docker's DNS replaced by
    loopback (nginx resolves upstream names at load). ``server ... resolve`` needs nginx 1.27.3+
    (the compose file runs 1.28); an older local nginx checks everything else."""
    nginx = shutil.which("nginx")
    if nginx is None:
        pytest.skip("nginx is not installed")
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", version)
    assert m, version
    conf = (DEPLOY / "nginx.conf").read_text()
    conf = conf.replace("server atlas:8000", "server 127.0.0.1:8000").replace("127.0.0.11", "127.0.0.1")
    if tuple(map(int, m.groups())) < (1, 27, 3):
        conf = conf.replace(" resolve;", ";")
    conf = conf.replace("http {", f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n\nhttp {{\n"
                        f"    access_log off;", 1)
    (tmp_path / "nginx.conf").write_text(conf)
    r = subprocess.run([nginx, "-t", "-q", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"),
                        "-c", str(tmp_path / "nginx.conf")], capture_output=True, text=True, timeout=60)
    if r.returncode != 0 and "Permission denied" in r.stderr:
        pytest.skip(f"nginx -t cannot run as this user: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr


# -- Kubernetes ----------------------------------------------------------------------------------

def kustomization(path: Path) -> dict[str, Any]:
    return yaml.safe_load((path / "kustomization.yaml").read_text())


def base_objects() -> list[dict[str, Any]]:
    k = kustomization(K8S / "base")
    return [d for name in k["resources"] for d in load_all(K8S / "base" / name)]


def strategic_merge(base: Any, patch: Any) -> Any:
    """Enough of kubectl's strategic merge for the overlays here: maps merge, lists of named
    objects (containers, env, ports) merge by name with patch entries first, other lists replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: strategic_merge(base[k], v) if k in base else v for k, v in patch.items()}}
    if isinstance(base, list) and isinstance(patch, list) and all(
            isinstance(x, dict) and "name" in x for x in base + patch):
        old = {x["name"]: x for x in base}
        merged = [strategic_merge(old[x["name"]], x) if x["name"] in old else x for x in patch]
        return merged + [x for x in base if x["name"] not in {p["name"] for p in patch}]
    return patch


def gpu_objects_by_merge() -> list[dict[str, Any]]:
    k = kustomization(K8S / "gpu")
    assert k["resources"] == ["../base"]
    objects = base_objects()
    for entry in k["patches"]:
        patch = yaml.safe_load((K8S / "gpu" / entry["path"]).read_text())
        objects = [strategic_merge(o, patch) if (o["kind"], o["metadata"]["name"]) ==
                   (patch["kind"], patch["metadata"]["name"]) else o for o in objects]
    return objects


def kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (kubectl kustomize renders the overlays offline)")
    r = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [o["metadata"]["name"] for o in found])
    return found[0]


def k8s_versions() -> list[str]:
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (dev extra)")
    return [K8S_OLDEST, kv.latest_version()]


def validate(objects: list[dict[str, Any]]) -> None:
    import kubernetes_validate as kv

    errors = []
    for version in k8s_versions():
        for obj in objects:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                errors.append(f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {version}): {where}: "
                              f"{e.message}")
    assert not errors, "\n".join(errors)


def test_kustomization_lists_every_manifest() -> None:
    listed = set(kustomization(K8S / "base")["resources"])
    present = {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == present
    # The Secret is never applied from the repository: no key ships with it.
    assert "secret.example.yaml" not in listed


def test_k8s_manifests_match_the_kubernetes_schemas() -> None:
    validate(base_objects() + load_all(K8S / "base" / "secret.example.yaml"))


def test_k8s_gpu_overlay_matches_the_kubernetes_schemas() -> None:
    validate(gpu_objects_by_merge())


@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_kubectl_kustomize_renders_valid_objects(overlay: str) -> None:
    rendered = kustomize(K8S / overlay)
    validate(rendered)
    if overlay == "gpu":
        # The Python merge above agrees with kustomize's.
        key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
        merged = {key(o): o for o in gpu_objects_by_merge()}
        deployment = one(rendered, "Deployment")
        ours = merged[key(deployment)]["spec"]["template"]["spec"]["containers"][0]
        theirs = deployment["spec"]["template"]["spec"]["containers"][0]
        assert ours["resources"] == theirs["resources"] and ours["image"] == theirs["image"]
        assert sorted(ours["env"], key=str) == sorted(theirs["env"], key=str)


def test_the_validator_rejects_broken_manifests() -> None:
    """The schema check has teeth: a misspelled field or a wrong type fails."""
    import kubernetes_validate as kv

    k8s_versions()
    deployment = one(base_objects(), "Deployment")
    typo = yaml.safe_load(yaml.safe_dump(deployment))
    container = typo["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    wrong_type = yaml.safe_load(yaml.safe_dump(deployment))
    wrong_type["spec"]["replicas"] = "two"
    for bad in (typo, wrong_type):
        with pytest.raises(kv.ValidationError):
            kv.validate(bad, kv.latest_version(), strict=True)


def probe_path(container: dict[str, Any], probe: str, ports: set[str | int]) -> str:
    get = container[probe]["httpGet"]
    assert get["port"] in ports
    return get["path"]


@pytest.mark.parametrize("variant", ["base", "gpu"])
def test_k8s_deployment_serves_drains_and_scales(variant: str) -> None:
    objects = base_objects() if variant == "base" else gpu_objects_by_merge()
    config = one(objects, "ConfigMap")["data"]
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()

    ports = {p["name"] for p in container["ports"]} | {p["containerPort"] for p in container["ports"]}
    assert int(config["ATLAS_PORT"]) in ports
    assert probe_path(container, "readinessProbe", ports) == "/ready"
    assert probe_path(container, "livenessProbe", ports) == "/health"

    # preStop, then the drain, then SIGKILL: the grace period covers both.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain_s = float(config["ATLAS_DRAIN_TIMEOUT_S"])
    assert spec["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + drain_s

    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"configMapRef": {"name": one(objects, "ConfigMap")["metadata"]["name"]}} in container["envFrom"]
    (keys,) = [e for e in container["env"] if e["name"] == "ATLAS_API_KEYS"]
    secret = one(load_all(K8S / "base" / "secret.example.yaml"), "Secret")
    ref = keys["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    if container["securityContext"].get("readOnlyRootFilesystem"):
        assert {"/tmp", config["ATLAS_DATA_DIR"]} <= mounts  # the only places it writes

    service = one(objects, "Service", "atlas-serve")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in ports
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]

    if variant == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert "cuda" in container["image"]
        assert {"name": "ATLAS_DEVICE", "value": "cuda"} in container["env"]
    else:
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {})


def test_k8s_redis_is_persistent_and_where_the_servers_look() -> None:
    objects = base_objects()
    config = one(objects, "ConfigMap")["data"]
    redis = one(objects, "StatefulSet", "atlas-redis")
    service = one(objects, "Service", redis["spec"]["serviceName"])
    url = config["ATLAS_REDIS_URL"]
    assert url.startswith(f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert mount["mountPath"] == args[args.index("--dir") + 1]
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()


# -- Dockerfiles ----------------------------------------------------------------------------------

def instructions(path: Path) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical = ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not logical.endswith("\\"):
            continue
        logical = logical[:-1] + " " + line.strip() if logical.endswith("\\") else line.strip()
        if logical and not logical.endswith("\\"):
            word, _, rest = logical.partition(" ")
            yield word.upper(), rest.strip()
            logical = ""


def pyproject() -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def build_inputs() -> set[str]:
    """What `pip install .` reads: pyproject, its readme, every package directory."""
    meta = pyproject()
    return {"pyproject.toml", meta["project"]["readme"], *meta["tool"]["setuptools"]["package-dir"].values()}


def makefile_torch_pin() -> str:
    m = re.search(r"^TORCH_PIN\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert m, "Makefile has no TORCH_PIN"
    return m.group(1)


def pip_installs(run: str) -> list[list[str]]:
    """The arguments of every ``pip install`` in a RUN line."""
    out = []
    for cmd in re.split(r"&&|;", run):
        words = shlex.split(cmd)
        for i in range(len(words) - 1):
            if words[i].endswith("pip") and words[i + 1] == "install":
                out.append(words[i + 2:])
    return out


def test_makefile_installs_pinned_torch_before_the_project() -> None:
    make = (ROOT / "Makefile").read_text()
    assert make.index('pip install -q "$(TORCH_PIN)"') < make.index('pip install -q -e ".[dev]"')


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_dockerfile_builds_like_the_makefile(variant: str) -> None:
    steps = list(instructions(DOCKERFILES[variant]))
    # Build arguments at their defaults (what a plain `docker build` uses), quotes removed.
    args = {k: v.strip('"') for i, a in steps if i == "ARG" and "=" in a for k, v in [a.split("=", 1)]}
    expand = lambda text: re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)
    froms = [expand(a) for i, a in steps if i == "FROM"]
    assert len(froms) >= 2 and any(" AS " in f.upper() for f in froms), "multi-stage"
    if variant == "cuda":
        assert froms[-1].startswith(("nvidia/cuda:", "pytorch/pytorch:")), froms
    else:
        assert froms[-1].startswith("python:"), froms

    installs = [words for i, a in steps if i == "RUN" for words in pip_installs(expand(a))]
    torch = [n for n, words in enumerate(installs) if any(w.startswith("torch==") for w in words)]
    project = [n for n, words in enumerate(installs) if words in (["."], [".[gpu]"])]
    assert torch and project and torch[0] < project[0], installs
    torch_words = installs[torch[0]]
    assert makefile_torch_pin() in torch_words
    index = torch_words[torch_words.index("--index-url") + 1]
    assert index.startswith("https://download.pytorch.org/whl/")
    assert index.rsplit("/", 1)[1] == "cpu" if variant == "cpu" else index.rsplit("/", 1)[1].startswith("cu")
    # `pip install .` sees only what was copied: pyproject, its readme and every package directory.
    copied = {src.rstrip("/") for i, a in steps if i == "COPY" and not a.startswith("--from")
              for src in a.split()[:-1]}
    missing = {p for p in build_inputs() if not any(p == src or p.startswith(src + "/") for src in copied)}
    assert not missing, f"{DOCKERFILES[variant].name} does not copy {sorted(missing)}"


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_dockerfile_runtime_is_non_root_with_a_healthcheck(variant: str) -> None:
    steps = list(instructions(DOCKERFILES[variant]))
    last_from = max(n for n, (i, _) in enumerate(steps) if i == "FROM")
    runtime = steps[last_from:]
    users = [a for i, a in runtime if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    health = [a for i, a in runtime if i == "HEALTHCHECK"]
    assert len(health) == 1 and "/health" in health[0]
    entry = [a for i, a in runtime if i in ("ENTRYPOINT", "CMD")]
    assert entry == ['["atlas"]', '["serve"]']  # exec form: the server is PID 1 and gets SIGTERM
    env = " ".join(a for i, a in runtime if i == "ENV")
    assert "ATLAS_HOST=0.0.0.0" in env


def test_dockerignore_keeps_what_the_images_copy() -> None:
    ignored = {line.strip().strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert not ignored & {p.split("/")[0] for p in build_inputs()}


def test_pip_install_dot_ships_every_package_file(tmp_path: Path) -> None:
    """The images run `pip install .` (not an editable install) on the copied sources, so the
    wheel must hold every file of the package directories, data files included."""
    src = tmp_path / "src"
    for rel in build_inputs():
        if (ROOT / rel).is_dir():
            shutil.copytree(ROOT / rel, src / rel, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    missing = []
    for package, folder in pyproject()["tool"]["setuptools"]["package-dir"].items():
        for path in (src / folder).rglob("*"):
            target = "/".join([*package.split("."), *path.relative_to(src / folder).parts])
            if path.is_file() and target not in shipped:
                missing.append(f"{path.relative_to(src)} (as {target})")
    assert not missing, f"not in the wheel (add them to [tool.setuptools.package-data]): {missing}"


# -- settings -------------------------------------------------------------------------------------

def test_every_atlas_variable_in_deploy_is_a_setting() -> None:
    """Settings ignore unknown ATLAS_* variables, so a misspelled one would silently do nothing."""
    known = settings_names()
    files = [COMPOSE, *DOCKERFILES.values(), *K8S.rglob("*.yaml")]
    for path in files:
        used = set(ATLAS_VAR.findall(path.read_text())) - COMPOSE_ONLY
        assert used <= known, (path.relative_to(ROOT), sorted(used - known))


def test_deploy_docs_list_every_setting() -> None:
    docs = (ROOT / "docs" / "deploy.md").read_text()
    table = set(re.findall(r"^\| `(ATLAS_[A-Z0-9_]+)` \|", docs, re.M))
    known = settings_names()
    assert table == known, {"missing": known - table, "unknown": table - known}
