"""The playground demo's routes in process (Starlette's TestClient over the ASGI app, real models, no
mocks): GET /v1/demo/document builds a document with facts hidden in it, GET /v1/demo/baseline reads
it with an attention-only checkpoint and answers each fact."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from starlette.testclient import TestClient

from atlas.engine import Atlas, save_checkpoint
from atlas.server.app import create_app
from atlas.server.settings import ServerSettings
from atlas.training.demo import (
    BASELINE_CHECKPOINT,
    DEMO_TASKS,
    MAX_DEMO_BYTES,
    ask_all,
    demo_document,
    is_right,
    read_document,
    shortest,
)

from .helpers import tiny_config

KEY = {"Authorization": "Bearer k-demo"}


@contextmanager
def serve(atlas, store, **settings) -> Iterator[TestClient]:
    app = create_app(ServerSettings(**{"api_keys": "k-demo:demo", **settings}), atlas=atlas, store=store)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def client(fast_atlas, store):
    with serve(fast_atlas, store) as c:
        yield c


@pytest.fixture(scope="module")
def baseline_dir(tmp_path_factory) -> Path:
    """A tiny attention-only checkpoint (every layer sliding-window attention)."""
    model = Atlas.from_config(tiny_config(layers=["swa"]), seed=3, device="cpu", dtype=torch.float32).model
    return save_checkpoint(model, tmp_path_factory.mktemp("baseline") / "swa-tiny")


def error(r, status: int, code: str) -> str:
    """Assert the one error shape with its status and code; the message."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]["message"]


def get_document(c, **params):
    return c.get("/v1/demo/document", params=params, headers=KEY)


def test_document_hides_its_facts_in_the_length_asked(client):
    for task, length in [("passkey", 2048), ("passkey_prose", 5000), ("multi_needle_prose", 16384),
                         ("babi_single", 4096), ("babi_two", 3000)]:
        r = get_document(client, task=task, length=length, seed=7)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"task", "seed", "length", "document", "facts", "prose"}
        assert (body["task"], body["seed"], body["length"]) == (task, 7, length)
        assert body["prose"] == ("synthetic filler" if task == "passkey" else "the built-in passage")
        facts = body["facts"]
        assert facts and all(f["question"].startswith("\n") and f["truth"] for f in facts)
        assert all(f["truth"] in body["document"] for f in facts), (task, facts)
        # the document and its first question are `length` bytes: what a byte-level model reads
        assert len(body["document"].encode()) + len(facts[0]["question"].encode()) == length
        want = demo_document(task, length, 7)  # what `atlas demo` and `atlas eval` build
        assert body["document"] == want.document
        assert [(f["question"], f["truth"]) for f in facts] == [(f.question, f.truth) for f in want.facts]
    assert len(get_document(client, task="multi_needle_prose", length=4096).json()["facts"]) == 4


def test_document_is_a_function_of_task_length_and_seed(client):
    a, b = (get_document(client, task="passkey_prose", length=3000, seed=11).json() for _ in range(2))
    assert a == b
    other = get_document(client, task="passkey_prose", length=3000, seed=12).json()
    assert other["document"] != a["document"]
    default = get_document(client).json()  # passkey_prose, 16384 bytes, seed 0
    assert (default["task"], default["length"], default["seed"]) == (DEMO_TASKS[0], 16384, 0)


def test_bad_requests_are_422_with_a_stable_code(client):
    for params, says in [({"task": "nonsense"}, "unknown demo task"),
                         ({"task": "passkey", "length": shortest("passkey") - 1}, "not"),
                         ({"task": "babi_count", "length": 10}, "bytes"),
                         ({"length": MAX_DEMO_BYTES + 1}, str(MAX_DEMO_BYTES)),
                         ({"length": -5}, "not -5"),
                         ({"length": 10**30}, "length")]:
        for route in ("document", "baseline"):
            r = client.get(f"/v1/demo/{route}", params=params, headers=KEY)
            assert says in error(r, 422, "invalid_request"), (route, params)
    for params in [{"length": "abc"}, {"length": "2048.5"}, {"seed": "x"}, {"seed": -1}, {"seed": 2**64}]:
        for route in ("document", "baseline"):
            r = client.get(f"/v1/demo/{route}", params=params, headers=KEY)
            error(r, 422, "invalid_request")
    r = get_document(client, task="passkey", length=shortest("passkey"))  # the shortest there is
    assert r.status_code == 200 and len(r.json()["facts"]) == 1


def test_the_server_limit_on_length(fast_atlas, store):
    with serve(fast_atlas, store, demo_max_bytes=5000) as c:
        assert get_document(c, task="passkey", length=5000).status_code == 200
        assert "5000" in error(get_document(c, task="passkey", length=5001), 422, "invalid_request")
    with pytest.raises(ValidationError):
        ServerSettings(demo_max_bytes=0)


def test_both_routes_need_a_key(client):
    for route in ("document", "baseline"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            error(client.get(f"/v1/demo/{route}", params={"task": "passkey", "length": 2048},
                             headers=headers), 401, "unauthorized")
            error(client.get(f"/v1/demo/{route}", params={"length": "abc"}, headers=headers),
                  401, "unauthorized")  # the key first, then the query


def test_no_baseline_beside_another_model_or_a_missing_checkpoint(client, fast_atlas, store, tmp_path):
    # The served model is not the bundled one and no baseline is configured.
    message = error(client.get("/v1/demo/baseline", params={"task": "passkey", "length": 2048}, headers=KEY),
                    404, "baseline_unavailable")
    assert "bundled" in message and "ATLAS_DEMO_BASELINE" in message
    with serve(fast_atlas, store, demo_baseline=str(tmp_path / "not-trained-yet")) as c:
        message = error(c.get("/v1/demo/baseline", params={"task": "passkey", "length": 2048}, headers=KEY),
                        404, "baseline_unavailable")
        assert "not-trained-yet" in message and str(tmp_path) not in message  # no server path shown
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with serve(fast_atlas, store, demo_baseline=str(broken)) as c:
        message = error(c.get("/v1/demo/baseline", params={"task": "passkey", "length": 2048}, headers=KEY),
                        404, "baseline_unavailable")
        assert "cannot be loaded" in message


def test_baseline_answers_every_fact(fast_atlas, store, baseline_dir):
    params = {"task": "multi_needle_prose", "length": 2048, "seed": 5}
    reference = Atlas.load(baseline_dir, device="cpu")
    doc = demo_document("multi_needle_prose", 2048, 5)
    said = ask_all(reference, read_document(reference, doc.document), doc.facts)
    with serve(fast_atlas, store, demo_baseline=str(baseline_dir)) as c:
        with ThreadPoolExecutor(2) as pool:  # two at once: the second waits for the first
            replies = list(pool.map(lambda _: c.get("/v1/demo/baseline", params=params, headers=KEY),
                                    range(2)))
        assert [r.status_code for r in replies] == [200, 200], [r.text for r in replies]
        body = replies[0].json()
        assert replies[1].json() == body
        assert set(body) == {"model", "fingerprint", "answers"}
        assert body["model"] == "swa-tiny" and body["fingerprint"] == reference.fingerprint
        answers = body["answers"]
        assert [(a["question"], a["truth"]) for a in answers] == [(f.question, f.truth) for f in doc.facts]
        assert [a["answer"] for a in answers] == said
        assert [a["right"] for a in answers] == [is_right(f, s) for f, s in zip(doc.facts, said, strict=True)]
        assert all(isinstance(a["right"], bool) for a in answers)
        # another document: read again, with the model loaded once
        other = c.get("/v1/demo/baseline", params={"task": "passkey", "length": 1024, "seed": 1}, headers=KEY)
        assert other.status_code == 200 and len(other.json()["answers"]) == 1


def test_the_bundled_model_gets_the_bundled_baseline(store):
    with serve(Atlas.load(device="cpu"), store) as c:
        r = c.get("/v1/demo/baseline", params={"task": "passkey", "length": 1024}, headers=KEY)
    if (BASELINE_CHECKPOINT / "config.json").exists():
        assert r.status_code == 200 and len(r.json()["answers"]) == 1, r.text
    else:  # still being trained: the message says how to make it
        assert "not installed" in error(r, 404, "baseline_unavailable")


def test_prose_from_a_file(fast_atlas, store, tmp_path):
    prose = tmp_path / "my-prose.txt"
    sentence = "The heron waited at the edge of the reeds until the fish forgot it was there. "
    prose.write_text(sentence * 40)
    with serve(fast_atlas, store, demo_prose=str(prose)) as c:
        body = get_document(c, task="passkey_prose", length=3000, seed=2).json()
        assert body["prose"] == "my-prose.txt" and "heron" in body["document"]
        filler = get_document(c, task="passkey", length=3000).json()
        assert filler["prose"] == "synthetic filler" and "heron" not in filler["document"]
    short = tmp_path / "short.txt"
    short.write_text("Too short to hide anything in.")
    with serve(fast_atlas, store, demo_prose=str(short)) as c:
        assert "too little prose" in error(get_document(c, task="passkey_prose", length=3000), 503,
                                           "demo_prose_invalid")
        assert get_document(c, task="passkey", length=3000).status_code == 200  # it reads no prose
    with pytest.raises(ValidationError, match="ATLAS_DEMO_PROSE"):
        ServerSettings(demo_prose=str(tmp_path / "missing.txt"))
    assert ServerSettings(demo_prose="", demo_baseline="").demo_prose is None


def test_a_baseline_run_its_client_left_stops(fast_checkpoint, baseline_dir, tmp_path):
    """The baseline reads one document at a time; a client that gives up on a long one (a timeout)
    must not keep the next request waiting for the whole read."""
    import httpx

    from .server_helpers import running_server

    env = {"ATLAS_MODEL": str(fast_checkpoint), "ATLAS_API_KEYS": "k-demo:acme",
           "ATLAS_DEMO_BASELINE": str(baseline_dir)}
    with running_server(tmp_path, env) as srv, httpx.Client(base_url=srv.url, headers=KEY) as c:
        assert c.get("/v1/demo/baseline", params={"task": "passkey", "length": 1024}).status_code == 200
        with pytest.raises(httpx.ReadTimeout):  # minutes of reading, abandoned after one second
            c.get("/v1/demo/baseline", params={"task": "passkey", "length": 32 << 20}, timeout=1.0)
        r = c.get("/v1/demo/baseline", params={"task": "passkey", "length": 2048}, timeout=60)
        assert r.status_code == 200 and r.elapsed.total_seconds() < 20, r.elapsed
