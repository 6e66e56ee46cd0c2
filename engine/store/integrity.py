"""A session's manifest: its format, its seal, and the checks every read of a session runs.

A manifest (see ``redis_store``) names the session, its tenant, the committed generation and write
id, the model fingerprint, the token and byte counters, the size and the checksum of every part.
``seal`` adds ``kid`` and ``mac`` over its canonical JSON; ``check`` recomputes them. The counters a
client sees and the bytes it is served are the manifest's, never the loose hash fields beside it,
so changing one field in Redis (``gen=0``, another ``tokens``, another tenant) is a refused state,
not a different answer.

Without a key the seal is a plain BLAKE2b digest: it catches damage, not an adversary who can write
to Redis (he can recompute it). With ``ATLAS_STATE_KEY`` it is a keyed BLAKE2b MAC, and part
checksums are a cryptographic hash (BLAKE2b) so a part cannot be swapped for one with the same
checksum: whoever writes to Redis without the key cannot forge a state that is served. Rotation:
set the new key as ``ATLAS_STATE_KEY`` and the old one in ``ATLAS_STATE_KEYS_OLD``; every commit seals
with the new key, sessions sealed with an old one are still read, and the old key can go once every
session was written again (or expired).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import zlib
from collections.abc import Callable
from typing import Any

import xxhash

FORMAT_VERSION = 2
#: Format 1 manifests (no seal, no counters) are still read when no key is set.
LEGACY_FORMAT = 1
#: Part checksums a manifest may name. xxh3 (XXH3-128, the default) runs at ~25 GB/s per core, so
#: checking costs far less than moving the bytes; crc32 at ~3 GB/s; sha256 at ~1.5 GB/s with SHA-NI,
#: for deployments that want a cryptographic hash. Parts are hashed in worker threads while other
#: parts travel over the socket. Loads use the algorithm the manifest names.
CHECKSUMS: dict[str, Callable[[memoryview | bytes], str]] = {
    "xxh3": xxhash.xxh3_128_hexdigest,
    "sha256": lambda b: hashlib.sha256(b).hexdigest(),
    "crc32": lambda b: f"{zlib.crc32(b):08x}",
    "blake2b": lambda b: hashlib.blake2b(b, digest_size=32).hexdigest(),
}
#: Checksums an adversary cannot match with other bytes: the only ones a keyed store writes or reads.
CRYPTOGRAPHIC = ("sha256", "blake2b")
#: A manifest over this size is refused unread (a 512 MB state in 4 MiB parts is ~12 KB).
MAX_MANIFEST_BYTES = 1 << 20

#: Session ids, tenants and write ids: printable ASCII without spaces or braces (Redis hash tags).
ID_RE = re.compile(r"[!-z|~]{1,200}")

#: Digest size in bytes of the seal (BLAKE2b-256).
_SEAL_BYTES = 32
_UNKEYED = ""  # kid of a seal without key


def _kid(key: bytes) -> str:
    """A short public name of a key, so a reader knows which key sealed a manifest."""
    return hashlib.blake2b(key, digest_size=6, person=b"atlas-kid").hexdigest()


def canonical(body: dict[str, Any]) -> bytes:
    """The bytes a seal covers: the manifest without its seal, keys sorted, no spaces."""
    return json.dumps({k: v for k, v in body.items() if k not in ("kid", "mac")}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True).encode()


class ManifestSeal:
    """Seals manifests with the current key (or none) and checks them with any known key."""

    def __init__(self, key: str | None = None, old_keys: list[str] | tuple[str, ...] = ()) -> None:
        self._current = key.encode() if key else None
        self._keys: dict[str, bytes] = {}
        for k in ([key] if key else []) + [k for k in old_keys if k]:
            self._keys[_kid(k.encode())] = k.encode()

    @property
    def keyed(self) -> bool:
        return self._current is not None

    def _mac(self, kid: str, body: dict[str, Any]) -> str | None:
        if kid == _UNKEYED:
            key = b""
        elif kid in self._keys:
            key = self._keys[kid]
        else:
            return None
        return hashlib.blake2b(canonical(body), key=key, digest_size=_SEAL_BYTES).hexdigest()

    def seal(self, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` with ``kid`` and ``mac`` (replacing any older seal)."""
        kid = _kid(self._current) if self._current else _UNKEYED
        mac = self._mac(kid, body)
        assert mac is not None
        return {**{k: v for k, v in body.items() if k not in ("kid", "mac")}, "kid": kid, "mac": mac}

    def check(self, body: dict[str, Any]) -> str | None:
        """None if the seal holds; else why not. With a key, an unkeyed seal is refused too."""
        kid, mac = body.get("kid"), body.get("mac")
        if not isinstance(kid, str) or not isinstance(mac, str):
            return "the manifest carries no seal"
        if self.keyed and kid == _UNKEYED:
            return "the manifest is not sealed with a key this server holds (ATLAS_STATE_KEY is set)"
        want = self._mac(kid, body)
        if want is None:
            return f"the manifest is sealed with an unknown key ({kid})"
        if not hmac.compare_digest(want, mac):
            return "the manifest's seal does not match its content"
        return None


class ManifestError(Exception):
    """Why a session's manifest is refused (the store turns it into StateCorruptError)."""


def well_formed(m: dict[str, Any]) -> bool:
    """A format 2 manifest has every field, of the right type, and parts that add up."""
    try:
        parts = m["parts"]
        return (all(isinstance(m[k], str) for k in ("sid", "tenant", "wid", "fingerprint", "hash"))
                and all(type(m[k]) is int and m[k] >= 0 for k in ("gen", "size", "tokens", "bytes_committed"))
                and m["hash"] in CHECKSUMS and isinstance(parts, list)
                and all(isinstance(p, list) and len(p) == 2 and type(p[0]) is int and p[0] >= 0
                        and isinstance(p[1], str) for p in parts)
                and sum(p[0] for p in parts) == m["size"]
                and (m["gen"] == 0) == (m["wid"] == "") and (m["gen"] > 0 or not parts)
                and (m["wid"] == "" or ID_RE.fullmatch(m["wid"]) is not None))
    except (KeyError, TypeError):
        return False


def legacy_manifest(sid: str, m: dict[str, Any], f: dict[str, str]) -> dict[str, Any]:
    """A format 1 manifest (no seal; counters in the hash) in format 2's shape."""
    try:
        out = {**m, "v": LEGACY_FORMAT, "sid": sid, "tenant": f["tenant"], "gen": int(f["gen"]),
               "tokens": int(f.get("tokens") or 0), "bytes_committed": int(f.get("bytes_committed") or 0),
               "size": int(m["size"]), "parts": [[int(p[0]), p[1]] for p in m["parts"]]}
        ok = (well_formed(out) and out["gen"] > 0 and m["wid"] == f.get("wid")
              and m["fingerprint"] == f.get("fingerprint"))
    except (KeyError, TypeError, ValueError, IndexError):
        ok = False
    if not ok:
        raise ManifestError("unreadable manifest")
    return out


def part_digest(part: memoryview | bytes, algorithm: str = "sha256") -> str:
    """Checksum of one part, as the manifest records it."""
    return CHECKSUMS[algorithm](part)


def check_manifest(seal: ManifestSeal, sid: str, f: dict[str, str]) -> dict[str, Any] | None:
    """The manifest of session `sid` from its hash fields `f`, checked: shape, seal, and agreement
    with the loose fields (ManifestError says why not). None for a format 1 session with nothing
    committed; a format 1 manifest in format 2's shape."""
    raw = f.get("manifest", "")
    if not raw:
        if f.get("gen", "") in ("", "0") and f.get("wid", "") == "" and not seal.keyed:
            return None
        raise ManifestError("the manifest is missing")
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError("the manifest is oversized")
    try:
        m = json.loads(raw)
    except ValueError:
        m = None
    if not isinstance(m, dict):
        raise ManifestError("unreadable manifest")
    if m.get("v") == LEGACY_FORMAT and not seal.keyed:
        return legacy_manifest(sid, m, f)
    if m.get("v") != FORMAT_VERSION:
        raise ManifestError(f"unreadable manifest (format {m.get('v')!r})")
    if why := seal.check(m):
        raise ManifestError(why)
    if not well_formed(m):
        raise ManifestError("unreadable manifest")
    if seal.keyed and m["gen"] > 0 and m["hash"] not in CRYPTOGRAPHIC:
        raise ManifestError(f"parts checked with {m['hash']}, not a cryptographic hash "
                      "(ATLAS_STATE_KEY is set)")
    if m["sid"] != sid:
        raise ManifestError(f"the manifest is session {m['sid']}'s")
    loose = {"tenant": m["tenant"], "gen": str(m["gen"]), "wid": m["wid"],
             "fingerprint": m["fingerprint"], "tokens": str(m["tokens"]),
             "bytes_committed": str(m["bytes_committed"]), "state_bytes": str(m["size"])}
    for name, want in loose.items():
        if f.get(name, "") != want:
            raise ManifestError(f"the {name} field disagrees with the sealed manifest")
    return m


__all__ = ["CHECKSUMS", "CRYPTOGRAPHIC", "FORMAT_VERSION", "ID_RE", "LEGACY_FORMAT", "MAX_MANIFEST_BYTES",
           "ManifestError", "ManifestSeal", "canonical", "check_manifest", "legacy_manifest",
           "part_digest", "well_formed"]
