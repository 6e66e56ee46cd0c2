"""The seal on a session's manifest: what decides what is served, checked on every read.

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
from typing import Any

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


__all__ = ["ManifestSeal", "canonical"]
