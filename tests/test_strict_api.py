"""Issue 28, finding 5: strict types on the native routes, error messages without Python reprs,
Retry-After on a lease conflict, and an over-limit chunked ingest that keeps what it read."""

from __future__ import annotations

import math
import re

import httpx
import pytest

from atlas.server.errors import validation_message

from .server_helpers import parse_sse, running_server
from .store_helpers import make_store
from .test_server_api import ACME, error, new_session, serve

ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


@pytest.fixture(scope="module")
def client(fast_atlas, store):
    with serve(fast_atlas, store, max_tokens=64, max_body_bytes=1 << 20) as c:
        yield c


# -- 1. strict types ---------------------------------------------------------------------------------

@pytest.mark.parametrize("body, field", [
    ({"commit": "yes"}, "commit"),
    ({"commit": 1}, "commit"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": 5.0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"temperature": "0"}, "temperature"),
    ({"top_k": "3"}, "top_k"),
    ({"seed": "7"}, "seed"),
    ({"prompt": 5}, "prompt"),
])
def test_generate_refuses_coercible_values(client, body, field):
    sid = new_session(client)
    r = client.post(f"/v1/sessions/{sid}/generate", json=body, headers=ACME)
    err = error(r, 422, "invalid_request")
    assert err["message"].startswith(f"{field}: "), err


def test_generate_still_takes_well_typed_values(client):
    sid = new_session(client)
    r = client.post(f"/v1/sessions/{sid}/generate", headers=ACME,
                    json={"prompt": "hi", "max_tokens": 3, "temperature": 0, "top_p": 1, "top_k": 0,
                          "seed": 1, "stop": "\n\n", "commit": False})
    assert r.status_code == 200, r.text
    assert parse_sse(r.text)[-1]["done"] is True


def test_session_create_refuses_a_string_ttl(client):
    r = client.post("/v1/sessions", json={"ttl_s": "60"}, headers=ACME)
    err = error(r, 422, "invalid_request")
    assert err["message"].startswith("ttl_s: "), err
    assert client.post("/v1/sessions", json={"ttl_s": 60}, headers=ACME).status_code == 201


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "temperature": "0.5"}, "temperature"),
    ({"prompt": "x", "stream": "true"}, "stream"),
    ({"prompt": "x", "n": "1"}, "n"),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
])
def test_completions_refuse_strings_for_numbers_and_booleans(client, body, field):
    """As OpenAI's API does; unknown fields are still ignored there."""
    r = client.post("/v1/completions", json={**body, "unknown_field": {"a": 1}}, headers=ACME)
    err = error(r, 422, "invalid_request")
    assert err["message"].startswith(f"{field}: "), err


def test_completions_take_integers_for_floats(client):
    r = client.post("/v1/completions", headers=ACME,
                    json={"prompt": "x", "max_tokens": 2, "temperature": 0, "top_p": 1, "whatever": 1})
    assert r.status_code == 200, r.text


# -- 2. clean messages -------------------------------------------------------------------------------

MALFORMED = [
    ("/v1/sessions/{sid}/generate", b'{"max_tokens": "5"}'),
    ("/v1/sessions/{sid}/generate", b'{"prompt": {"a": [1, 2]}, "stop": [1, {}]}'),
    ("/v1/sessions/{sid}/generate", b'{"prompt": "\\ud800"}'),
    ("/v1/sessions/{sid}/generate", b'[1, 2, 3]'),
    ("/v1/sessions/{sid}/generate", b'"text"'),
    ("/v1/sessions/{sid}/generate", b'{"commit": "yes", '),
    ("/v1/sessions/{sid}/generate", b'\xff\xfe\x00'),
    ("/v1/sessions/{sid}/generate", b'{"nope": 1, "max_tokens": -1, "top_p": 0}'),
    ("/v1/sessions", b'{"ttl_s": "x"}'),
    ("/v1/sessions", b'[{"ttl_s": 1}]'),
    ("/v1/completions", b'{"prompt": [[1], {}], "max_tokens": []}'),
    ("/v1/completions", b'{"prompt": "x", "stream_options": "yes"}'),
    ("/v1/completions", b'{"prompt": "x", "stop": [null]}'),
    ("/v1/completions", b'null'),
]


@pytest.mark.parametrize("path, raw", MALFORMED)
def test_no_memory_addresses_in_messages(client, path, raw):
    sid = new_session(client)
    r = client.post(path.format(sid=sid), content=raw, headers={**ACME, "Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    message = r.json()["error"]["message"]
    assert not ADDRESS.search(message) and " object at " not in message, message


def test_validation_message_drops_reprs():
    from pydantic import BaseModel, ConfigDict

    class Opaque:
        pass

    class M(BaseModel):
        model_config = ConfigDict(strict=True)
        n: int

    from pydantic import ValidationError
    with pytest.raises(ValidationError) as e:
        M.model_validate({"n": Opaque()})
    message = validation_message(e.value)
    assert message == "n: Input should be a valid integer", message


# -- 3. Retry-After on a lease conflict ---------------------------------------------------------------

def test_lease_conflict_says_when_to_retry(fast_atlas, standalone_redis, redis_store):
    other = make_store(standalone_redis.url, redis_store.settings.key_prefix)
    try:
        with serve(fast_atlas, redis_store) as c:
            sid = new_session(c)
            with other.lease(sid, "replica-b", ttl_ms=9_500):
                r = c.post(f"/v1/sessions/{sid}/ingest", content=b"some text",
                           headers={**ACME, "Content-Type": "text/plain"})
                error(r, 409, "lease_conflict")
                retry = int(r.headers["Retry-After"])
                assert 5 <= retry <= math.ceil(9.5), r.headers  # rounded up from what is left (< 9.5 s)
            r = c.post(f"/v1/sessions/{sid}/ingest", content=b"some text",
                       headers={**ACME, "Content-Type": "text/plain"})
            assert r.status_code == 200, r.text
    finally:
        other.close()


def test_retry_after_is_at_least_one_second():
    from atlas.engine.store import LeaseConflictError
    from atlas.server.errors import to_api_error

    for ms, want in ((1, "1"), (0, "1"), (1000, "1"), (1001, "2"), (29_999, "30")):
        err = to_api_error(LeaseConflictError("held", sid="s", retry_after_ms=ms))
        assert err is not None and err.status == 409 and err.headers["Retry-After"] == want, (ms, err)
    err = to_api_error(LeaseConflictError("fence is stale", sid="s"))  # no lease to wait for
    assert err is not None and "Retry-After" not in err.headers


# -- 4. an over-limit chunked ingest keeps what it read ----------------------------------------------

LIMIT = 5000


def test_chunked_ingest_over_the_limit_keeps_what_was_read(fast_checkpoint, tmp_path):
    from .helpers import document

    data = document(20_000)

    def chunks():
        for i in range(0, len(data), 1000):
            yield data[i:i + 1000]

    env = {"ATLAS_MODEL": str(fast_checkpoint), "ATLAS_API_KEYS": "k-acme:acme",
           "ATLAS_MAX_BODY_BYTES": str(LIMIT)}
    with running_server(tmp_path, env) as srv, httpx.Client(base_url=srv.url, headers=ACME, timeout=60) as c:
        sid = c.post("/v1/sessions").json()["id"]
        r = c.post(f"/v1/sessions/{sid}/ingest", content=chunks(), headers={"Content-Type": "text/plain"})
        if r.status_code == 413:
            err = r.json()["error"]
        else:
            assert r.status_code == 200, r.text
            err = parse_sse(r.text)[-1]["error"]
        assert err["code"] == "body_too_large", err
        kept = c.get(f"/v1/sessions/{sid}").json()["bytes_committed"]
        assert 0 < kept <= LIMIT, kept
        assert f"bytes_committed {kept}," in err["message"], err
        # resume from there: the rest, in pieces under the limit, makes the whole document
        while kept < len(data):
            piece = data[kept:kept + LIMIT]
            r = c.post(f"/v1/sessions/{sid}/ingest", params={"offset": kept}, content=piece,
                       headers={"Content-Type": "text/plain"})
            assert r.status_code == 200, r.text
            kept = parse_sse(r.text)[-1]["bytes_committed"]
        assert kept == len(data)
