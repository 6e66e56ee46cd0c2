"""Sessions that travel (issue 23): export a session as one file and import it elsewhere, change its
labels and TTL, page through a tenant's sessions."""

from __future__ import annotations

import io
import json
import pickle
import struct
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from starlette.testclient import TestClient

from atlas.engine import Atlas
from atlas.engine.checkpoint import save_checkpoint
from atlas.engine.session_file import MAX_HEADER_BYTES
from atlas.engine.store import StoreSettings, open_store
from atlas.server.app import create_app
from atlas.server.settings import ServerSettings

from .helpers import tiny_atlas
from .server_helpers import parse_sse, running_server
from .store_helpers import make_store, redis_server

A = {"Authorization": "Bearer ka"}
B = {"Authorization": "Bearer kb"}
KEYS = "ka:acme,kb:other"
DOC = b"The pass key is 4721. Remember it: the pass key is 4721. Ingested text ends mid-wor"


@pytest.fixture(scope="module")
def atlas() -> Atlas:
    return Atlas.load(device="cpu")


@pytest.fixture
def client(atlas, tmp_path):
    store = open_store(StoreSettings(data_dir=tmp_path / "data"))
    app = create_app(ServerSettings(api_keys=KEYS, max_sessions_per_tenant=50), atlas=atlas, store=store)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _session(c, doc: bytes = DOC, headers=A) -> str:
    sid = c.post("/v1/sessions", headers=headers).json()["id"]
    r = c.post(f"/v1/sessions/{sid}/ingest", headers={**headers, "Content-Type": "text/plain"}, content=doc)
    assert r.status_code == 200, r.text
    return sid


def _export(c, sid: str, headers=A) -> bytes:
    r = c.get(f"/v1/sessions/{sid}/state", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    return r.content


# -- one server to another, byte-level and tokenizer.json models ----------------------------------------

def _tokenizer_model(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    lines = [DOC.decode(), "the quick brown fox jumps over the lazy dog", "mid-word splits"] * 50
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = tiny_atlas(torch.float32, vocab_size=tok.get_vocab_size(), d_model=16, chunk_size=16,
                       swa_window=16).model
    save_checkpoint(model, folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def _greedy(c: httpx.Client, sid: str) -> list[int]:
    r = c.post(f"/v1/sessions/{sid}/generate", json={"prompt": "\nQ: the pass key?", "max_tokens": 12,
                                                      "temperature": 0})
    assert r.status_code == 200, r.text
    return [e["token"] for e in parse_sse(r.text)[:-1]]


@pytest.mark.parametrize("model", ["bundled", pytest.param("tokenizer.json", marks=pytest.mark.slow)])
def test_export_from_one_server_import_into_another(tmp_path, model):
    env = {"ATLAS_API_KEYS": KEYS}
    if model != "bundled":
        env["ATLAS_MODEL"] = str(_tokenizer_model(tmp_path / "model"))
    with redis_server(tmp_path / "redis") as redis_b, \
            running_server(tmp_path / "a", env) as a, \
            running_server(tmp_path / "b", {**env, "ATLAS_REDIS_URL": redis_b.url}) as b, \
            httpx.Client(base_url=a.url, headers=A, timeout=60) as ca, \
            httpx.Client(base_url=b.url, headers=A, timeout=60) as cb:
        sid = _session(ca)
        r = ca.patch(f"/v1/sessions/{sid}", json={"name": "notes", "metadata": {"k": "v"}})
        assert r.status_code == 200
        with ca.stream("GET", f"/v1/sessions/{sid}/state") as r:  # streamed, piece by piece
            assert r.status_code == 200
            file = b"".join(r.iter_bytes())
        n = struct.unpack("<Q", file[:8])[0]
        info = json.loads(json.loads(file[8:8 + n])["__metadata__"]["atlas"])
        assert (info["held_bytes"] > 0) == (model != "bundled")  # a tokenizer holds "mid-wor" back
        r = cb.post("/v1/sessions/import", content=file, headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        new = r.json()
        old = ca.get(f"/v1/sessions/{sid}").json()
        for k in ("tokens", "bytes_committed", "state_bytes", "name", "metadata"):
            assert new[k] == old[k], k
        state_a = open_store(StoreSettings(data_dir=tmp_path / "a" / "data"))
        state_b = make_store(redis_b.url, "atlas")
        try:
            assert state_a.get(sid)[0] == state_b.get(new["id"])[0]  # bit-identical
        finally:
            state_a.close()
            state_b.close()
        assert _greedy(ca, sid) == _greedy(cb, new["id"])
        # resuming the document on the import continues it exactly as on the original
        tail = b"d, and more text follows."
        for c, s in ((ca, sid), (cb, new["id"])):
            r = c.post(f"/v1/sessions/{s}/ingest", content=tail, headers={"Content-Type": "text/plain"},
                       params={"offset": len(DOC)})
            assert r.status_code == 200, r.text
        assert _greedy(ca, sid) == _greedy(cb, new["id"])


# -- the import refuses anything but a whole, unaltered file of this model ------------------------------

def _rewrite(file: bytes, edit) -> bytes:
    """A well-formed safetensors file whose tensors or manifest were changed by ``edit``."""
    n = struct.unpack("<Q", file[:8])[0]
    info = json.loads(json.loads(file[8:8 + n])["__metadata__"]["atlas"])
    tensors = dict(st_load(file))
    edit(tensors, info)
    return st_save(tensors, metadata={"atlas": json.dumps(info)})


class _Marker:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/atlas-import-ran-code"),))


def _forgeries(file: bytes, other_model_file: bytes) -> dict[str, bytes]:
    n = struct.unpack("<Q", file[:8])[0]
    header = json.loads(file[8:8 + n])
    out: dict[str, bytes] = {"empty": b"", "short": file[:5], "header only": file[:8 + n],
                             "foreign model": other_model_file}
    # truncated at every part boundary: the header and each tensor's start and end
    for name, t in header.items():
        if name == "__metadata__":
            continue
        for o in t["data_offsets"]:
            if 8 + n + o < len(file):
                out[f"cut at {name}@{o}"] = file[:8 + n + o]
    out["one byte short"] = file[:-1]
    out["one byte more"] = file + b"\0"
    for i, pos in enumerate(range(3, len(file), max(1, len(file) // 60))):
        flipped = bytearray(file)
        flipped[pos] ^= 1 << (i % 8)
        out[f"bit flip at {pos}"] = bytes(flipped)
    out["huge header length"] = struct.pack("<Q", 1 << 60) + file[8:]
    out["header over the bound"] = struct.pack("<Q", MAX_HEADER_BYTES + 1) + file[8:]
    big = dict(header)
    first = next(k for k in big if k != "__metadata__")
    big[first] = {**big[first], "shape": [1 << 40], "data_offsets": [0, 1 << 42]}
    body = json.dumps(big).encode()
    out["huge declared tensor"] = struct.pack("<Q", len(body)) + body + file[8 + n:]

    def with_(**kw):
        return lambda t, info: info.update(kw)

    out["format v2"] = _rewrite(file, with_(format="atlas-session/2"))
    out["state format v9"] = _rewrite(file, with_(state_format="atlas-state/9"))
    out["tokens forged"] = _rewrite(file, lambda t, i: i.update(tokens=i["tokens"] + 1))
    out["bytes negative"] = _rewrite(file, with_(bytes_committed=-1))
    out["bytes not a number"] = _rewrite(file, with_(bytes_committed="12"))
    out["bytes past 2^62"] = _rewrite(file, with_(bytes_committed=1 << 63))
    out["bytes beyond the tokens"] = _rewrite(file, lambda t, i: i.update(bytes_committed=i["tokens"] + 1))
    out["held bytes forged"] = _rewrite(file, with_(held_bytes=5))
    out["checksum forged"] = _rewrite(file, with_(state_sha256="0" * 64))
    out["no checksum"] = _rewrite(file, lambda t, i: i.pop("state_sha256"))
    out["fingerprint forged"] = _rewrite(file, with_(fingerprint="f" * 64))
    out["name too long"] = _rewrite(file, with_(name="x" * 500))
    out["metadata too big"] = _rewrite(file, with_(metadata={f"k{i}": "v" * 200 for i in range(40)}))
    out["not atlas metadata"] = st_save(dict(st_load(file)), metadata={"other": "1"})

    def resealed(edit):
        """Tensors changed and the checksum recomputed: well-formed but not this model's state."""
        def go(t, info):
            edit(t)
            import hashlib

            from atlas.engine.state import SessionState
            info["state_sha256"] = hashlib.sha256(SessionState(t, info["fingerprint"]).to_bytes()).hexdigest()
        return _rewrite(file, go)

    name = next(k for k in header if k.endswith(".mem.W"))
    out["wrong dtype"] = resealed(lambda t: t.update({name: t[name].double()}))
    out["wrong dtype fp16"] = resealed(lambda t: t.update({name: t[name].half()}))
    out["wrong shape"] = resealed(lambda t: t.update({name: t[name][..., :-1].contiguous()}))
    out["two sessions"] = resealed(lambda t: t.update({k: torch.cat([v, v]) for k, v in t.items()}))
    out["unexpected tensor"] = resealed(lambda t: t.update({"evil": torch.zeros(1, 3)}))
    out["missing tensor"] = resealed(lambda t: t.pop(name))
    out["nan values"] = resealed(lambda t: t[name].view(-1).__setitem__(0, float("nan")))
    out["huge values"] = resealed(lambda t: t[name].view(-1).__setitem__(0, 3e38))
    out["pending out of vocabulary"] = resealed(lambda t: t["pending"].view(-1).__setitem__(0, 1 << 20))
    buf = io.BytesIO()
    pickle.dump({"state": _Marker()}, buf)
    out["a pickle"] = buf.getvalue()
    torch_buf = io.BytesIO()
    torch.save({"x": torch.zeros(3)}, torch_buf)
    out["a torch.save file"] = torch_buf.getvalue()
    return out


def test_import_refuses_every_damaged_or_forged_file(client, atlas):
    marker = Path("/tmp/atlas-import-ran-code")
    marker.unlink(missing_ok=True)
    sid = _session(client)
    file = _export(client, sid)
    other = tiny_atlas(torch.float32, vocab_size=atlas.config.vocab_size)
    from atlas.engine import session_file

    other_file = session_file.write(other.save_state(other.new_state()), fingerprint=other.fingerprint,
                                    tokens=0, bytes_committed=0)
    cases = _forgeries(file, other_file)
    assert len(cases) > 100
    before = len(client.get("/v1/sessions", headers=A).json()["data"])
    accepted, errors_5xx, codes = [], [], {}
    for what, body in cases.items():
        r = client.post("/v1/sessions/import", headers=A, content=body)
        codes[r.json()["error"]["code"] if r.status_code >= 400 else "accepted"] = r.status_code
        if r.status_code < 400:
            accepted.append(what)
        if r.status_code >= 500:
            errors_5xx.append((what, r.text))
    assert not accepted and not errors_5xx
    assert codes == {"invalid_session_file": 400, "foreign_model": 409}
    assert not marker.exists()  # nothing was unpickled or run
    assert client.get("/health").status_code == 200
    assert len(client.get("/v1/sessions", headers=A).json()["data"]) == before  # nothing stored
    assert client.post("/v1/sessions/import", headers=A, content=file).status_code == 201  # the real one
    text = client.get("/metrics", headers=A).text
    assert 'atlas:session_import_refusals_total{reason="checksum"}' in text
    assert "atlas:session_imports_total 1.0" in text and "atlas:session_exports_total 1.0" in text


def test_import_size_is_checked_while_streaming(client, atlas):
    limit = atlas.state_bytes + MAX_HEADER_BYTES

    def body():
        for _ in range(limit // (1 << 16) + 2):
            yield b"\0" * (1 << 16)

    r = client.post("/v1/sessions/import", headers=A, content=body())
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = client.post("/v1/sessions/import", headers={**A, "Content-Length": str(limit + 1)}, content=b"x")
    assert r.status_code == 413


# -- tenants ------------------------------------------------------------------------------------------

def test_a_tenant_cannot_export_patch_or_see_another_tenants_session(client):
    sid = _session(client)
    for method, path, kw in [("GET", f"/v1/sessions/{sid}/state", {}), ("GET", f"/v1/sessions/{sid}", {}),
                             ("PATCH", f"/v1/sessions/{sid}", {"json": {"name": "mine"}}),
                             ("DELETE", f"/v1/sessions/{sid}", {})]:
        r = client.request(method, path, headers=B, **kw)
        assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found", (method, path)
    file = _export(client, sid)
    new = client.post("/v1/sessions/import", headers=B, content=file).json()["id"]  # B imports a copy
    assert [s["id"] for s in client.get("/v1/sessions", headers=B).json()["data"]] == [new]
    assert new not in [s["id"] for s in client.get("/v1/sessions", headers=A).json()["data"]]
    assert client.get(f"/v1/sessions/{new}", headers=A).status_code == 404
    assert client.get(f"/v1/sessions/{sid}", headers=A).json()["name"] is None  # A's is untouched


# -- labels, TTLs, pages --------------------------------------------------------------------------------

def test_patch_name_metadata_and_ttl(client):
    sid = client.post("/v1/sessions", headers=A).json()["id"]
    labels = {"client": "x", "pages": 12, "ok": True}
    r = client.patch(f"/v1/sessions/{sid}", headers=A,
                     json={"name": "contract", "metadata": labels, "ttl_s": 60})
    assert r.status_code == 200, r.text
    s = r.json()
    assert (s["name"], s["metadata"], s["ttl_s"]) == ("contract", labels, 60)
    assert s["updated"] == s["created"]  # `updated` is the last commit's time: labels are not one
    s = client.patch(f"/v1/sessions/{sid}", headers=A, json={"ttl_s": None}).json()
    assert s["ttl_s"] is None and s["name"] == "contract"  # fields left out stay
    s = client.patch(f"/v1/sessions/{sid}", headers=A, json={"name": None, "metadata": {}}).json()
    assert s["name"] is None and s["metadata"] == {}
    for bad in [{"name": ""}, {"name": "x" * 129}, {"name": "a\nb"}, {"metadata": {"k": [1]}},
                {"metadata": {f"k{i}": 1 for i in range(33)}}, {"metadata": {"k": "v" * 5000}},
                {"metadata": {"k": "ü" * 2100}},
                {"ttl_s": 0}, {"ttl_s": "60"}, {"sliding_ttl": "yes"}, {"owner": "me"}]:
        r = client.patch(f"/v1/sessions/{sid}", headers=A, json=bad)
        assert r.status_code == 422, (bad, r.text)
    lone_surrogate = b'{"metadata": {"k": "\\ud800"}}'  # JSON allows it; UTF-8 cannot hold it
    r = client.patch(f"/v1/sessions/{sid}", headers={**A, "Content-Type": "application/json"},
                     content=lone_surrogate)
    assert r.status_code == 422, r.text
    assert client.get("/v1/sessions", headers=A).status_code == 200  # nothing unlistable was stored
    # the limit counts the UTF-8 bytes of compact JSON, as a client sends them (not \u00fc escapes)
    r = client.patch(f"/v1/sessions/{sid}", headers=A, json={"metadata": {"k": "ü" * 2000}})
    assert r.status_code == 200 and r.json()["metadata"]["k"] == "ü" * 2000


def test_ttls_expire_and_slide(client):
    fixed = client.post("/v1/sessions", headers=A, json={"ttl_s": 2}).json()["id"]
    sliding = client.post("/v1/sessions", headers=A).json()["id"]
    assert client.patch(f"/v1/sessions/{sliding}", headers=A,
                        json={"ttl_s": 2, "sliding_ttl": True}).json()["sliding_ttl"] is True
    for _ in range(3):  # reads keep the sliding one alive past its TTL
        time.sleep(0.9)
        assert client.get(f"/v1/sessions/{sliding}", headers=A).status_code == 200
    assert client.get(f"/v1/sessions/{fixed}", headers=A).status_code == 404  # expired
    time.sleep(2.3)
    assert client.get(f"/v1/sessions/{sliding}", headers=A).status_code == 404  # no reads: expired too


def test_pages_and_filters(client):
    ids = []
    for i in range(7):
        sid = client.post("/v1/sessions", headers=A).json()["id"]
        labels = {"i": i, "team": "t1" if i < 3 else "t2"}
        client.patch(f"/v1/sessions/{sid}", headers=A,
                     json={"name": "odd" if i % 2 else "even", "metadata": labels})
        ids.append(sid)
    seen, cursor = [], None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/sessions", headers=A, params=params).json()
        seen += [s["id"] for s in page["data"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    assert seen == ids  # oldest first, each once
    evens = client.get("/v1/sessions", headers=A, params={"name": "even"}).json()["data"]
    assert [s["id"] for s in evens] == ids[0::2]
    both = client.get("/v1/sessions", headers=A, params=[("metadata", "team=t2"), ("metadata", "i=4")]).json()
    assert [s["id"] for s in both["data"]] == [ids[4]]
    for bad in [{"cursor": "garbage!"}, {"metadata": "no-equals"}, {"limit": 0}]:
        r = client.get("/v1/sessions", headers=A, params=bad)
        assert r.status_code in (400, 422), (bad, r.text)
