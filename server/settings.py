"""Server settings: every field has an ``ATLAS_<NAME>`` environment variable.

The store (``ATLAS_REDIS_URL``, ``ATLAS_DATA_DIR``, ...) and the runtime (``ATLAS_MAX_REQUESTS``,
``ATLAS_CHECKPOINT_TOKENS``, ...) read their own settings from the same environment; these are the
HTTP side's: where to listen, who may call, which model, and the limits a request must stay within.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .logs import LogFormat

MiB = 1 << 20
#: The weights' dtypes a server can run, and the short names ATLAS_DTYPE also takes.
WeightsDtype = Literal["float32", "bfloat16", "float16"]
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16",
                 "f16": "float16", "half": "float16"}
_ORIGIN = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s,]+")
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: A tenant is a store id (engine/store/integrity.py, ID_RE) without ":", which in a key list
#: means a malformed entry ("k1:a;k2:b"); a key is visible ASCII (an HTTP header carries it).
_TENANT = re.compile(r"[!-9;-z|~]{1,200}")
_KEY = re.compile(r"[!-+\--~]+")
LOOPBACK_NAMES = {"localhost", "ip6-localhost", "ip6-loopback"}


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; anything else (including 0.0.0.0) is remote."""
    if not host:
        return False
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ServerSettings(BaseSettings):
    """HTTP server settings (``ATLAS_*``)."""

    model_config = SettingsConfigDict(env_prefix="ATLAS_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    #: ``key:tenant,key2:tenant2``. Empty: no auth, every caller is tenant ``default`` and only
    #: loopback clients are served unless ``allow_remote``.
    api_keys: SecretStr = SecretStr("")
    #: Serve non-loopback clients (and bind a non-loopback host) even without API keys.
    allow_remote: bool = False
    #: Checkpoint directory; unset: the bundled demo model.
    model: str | None = None
    #: Model id shown by /v1/models and required in /v1/completions' ``model`` (default: the
    #: checkpoint directory's name, or ``atlas-demo``).
    model_id: str | None = None
    #: auto (CUDA when there is a GPU), cpu, cuda or cuda:N (checked at start: engine.api.resolve_device)
    device: str = "auto"
    #: Dtype of the weights and activations (float32, bfloat16 or float16; bf16, fp16, fp32 too).
    #: The recurrent state stays fp32 whatever it is (docs/model.md, "Precision").
    dtype: WeightsDtype = "float32"
    #: torch intra-op threads (unset: engine/threads.py chooses from the model and the free cores).
    torch_threads: int | None = Field(None, ge=1)

    # -- limits -------------------------------------------------------------------------------------
    #: Bytes of document one ingest request may carry (enforced while streaming: 413).
    max_body_bytes: int = Field(256 * MiB, ge=1)
    #: Bytes of a JSON request body (sessions, generate, completions).
    max_json_bytes: int = Field(4 * MiB, ge=1)
    #: Cap on ``max_tokens`` of one generation (400 ``max_tokens_too_large`` above it).
    max_tokens: int = Field(4096, ge=1)
    #: Cap on the prompt of one generation, in tokens (400 ``prompt_too_long``); long documents
    #: go through ingest.
    max_prompt_tokens: int = Field(65536, ge=1)
    #: Sessions one tenant may hold (429 ``too_many_sessions`` beyond it).
    max_sessions_per_tenant: int = Field(10_000, ge=1)
    #: A generation running longer stops and returns what it has (finish_reason ``timeout``).
    request_timeout_s: float = Field(300.0, gt=0)
    #: On SIGTERM: how long in-flight requests may take to finish before they are cancelled.
    drain_timeout_s: float = Field(30.0, ge=0, allow_inf_nan=False)
    #: Least time between two ingest progress events (the final event always comes).
    progress_interval_s: float = Field(0.2, ge=0)
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    #: ``text`` (uvicorn's look) or ``json`` (one object per line: time, level, logger, message,
    #: request_id), for ``atlas serve``'s log on stderr (server/logs.py).
    log_format: LogFormat = "text"
    #: Origins whose browser pages may call the API (CORS): ``*``, or a comma-separated list such
    #: as ``https://app.example.com,http://localhost:5173``. Empty (the default): CORS off, so a
    #: page from another origin cannot read any answer. Keys still go in Authorization headers.
    cors_origins: str = ""

    # -- the playground's demo (routes/demo.py, training/demo.py) ---------------------------------
    #: Prose the demo hides its facts in: a text file, or a corpus folder (its eval-prose.txt, see
    #: ``atlas corpus build``). Unset: the built-in passage.
    demo_prose: str | None = None
    #: Checkpoint whose answers go beside the model's in the demo (any model, like ``atlas demo
    #: --baseline``). Unset: the bundled attention-only baseline (engine/assets/demo-baseline), and
    #: only when the server runs the bundled model.
    demo_baseline: str | None = None
    #: The longest demo document, in bytes (a byte-level model's tokens); at most 64 MiB whatever
    #: this says (training/demo.py, MAX_DEMO_BYTES).
    demo_max_bytes: int = Field(64 * MiB, ge=1)

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.strip().lower().removeprefix("torch.")
            return DTYPE_ALIASES.get(v, v)
        return v

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("demo_prose", "demo_baseline", mode="before")
    @classmethod
    def _unset_if_empty(cls, v: object) -> object:
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("demo_prose")
    @classmethod
    def _check_prose(cls, v: str | None) -> str | None:
        if v is not None:  # fail at start, not at the first demo (the text itself is read then)
            path = Path(v)
            if not (path / "eval-prose.txt" if path.is_dir() else path).is_file():
                raise ValueError(f"ATLAS_DEMO_PROSE: {v} is neither a text file nor a corpus folder "
                                 "with an eval-prose.txt")
        return v

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, v: str) -> str:
        parse_origins(v)  # fail at start, not at the first browser request
        return v

    @field_validator("api_keys")
    @classmethod
    def _parse_keys(cls, v: SecretStr) -> SecretStr:
        parse_api_keys(v.get_secret_value())  # fail at start, not at the first request
        return v

    @property
    def tenants_by_key(self) -> dict[str, str]:
        return parse_api_keys(self.api_keys.get_secret_value())

    @property
    def auth_enabled(self) -> bool:
        return bool(self.tenants_by_key)

    @property
    def cors_origin_list(self) -> list[str]:
        return parse_origins(self.cors_origins)


def parse_origins(spec: str) -> list[str]:
    """``"*"`` -> ["*"]; ``"https://a.example, HTTP://Localhost:5173/"`` -> the origins as a browser
    sends them in its Origin header: scheme://host[:port] in lower case, without the scheme's
    default port or a trailing slash. Anything that could never match one is refused: a path, a
    query, a fragment, user info, a wildcard in the host."""
    out: list[str] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        if item == "*":
            out.append(item)
            continue
        origin = _origin(item.rstrip("/"))
        if origin is None:
            raise ValueError(f"ATLAS_CORS_ORIGINS: {item!r} is not an origin such as "
                             "https://app.example.com or http://localhost:5173 (or *); no paths, "
                             "queries, user info or wildcards")
        out.append(origin)
    return out


def _origin(item: str) -> str | None:
    if not _ORIGIN.fullmatch(item) or any(c in item for c in "?#@*"):
        return None
    scheme, _, hostport = item.lower().partition("://")
    try:
        port = urlsplit(item).port
    except ValueError:
        return None
    if port is not None and _DEFAULT_PORTS.get(scheme) == port:
        hostport = hostport.rsplit(":", 1)[0]
    return f"{scheme}://{hostport}"


def parse_api_keys(spec: str) -> dict[str, str]:
    """``"k1:acme,k2:globex"`` -> {"k1": "acme", "k2": "globex"}; a bare key is tenant ``default``."""
    out: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        key, _, tenant = item.partition(":")
        key, tenant = key.strip(), tenant.strip() or "default"
        if not key:
            raise ValueError("ATLAS_API_KEYS has an entry with an empty key")
        if not _KEY.fullmatch(key):
            raise ValueError("ATLAS_API_KEYS: a key is visible ASCII characters, no spaces or commas "
                             f"(entry {len(out) + 1})")
        if not _TENANT.fullmatch(tenant):
            raise ValueError(f"ATLAS_API_KEYS: tenant {tenant!r} (entry {len(out) + 1}): 1 to 200 "
                             "visible ASCII characters, no ':', '{' or '}'; entries are KEY:TENANT, "
                             "separated by commas")
        if key in out:
            raise ValueError(f"ATLAS_API_KEYS: a key is listed twice (entry {len(out) + 1})")
        out[key] = tenant
    return out
