"""``POST /v1/chat/completions`` through a real server and the official ``openai`` client: a model
made with ``atlas init`` from a BPE tokenizer whose tokenizer_config.json holds a ChatML-like
template; streaming with usage, the template rendered as transformers renders it, sessions and
commit, and every parameter the server refuses (on both OpenAI routes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from atlas.engine import Atlas, SamplingParams
from bench.server_process import ServerProcess

from .openai_helpers import chat_model, chatml_reference
from .server_helpers import parse_sse, running_server

MESSAGES = [{"role": "system", "content": "You answer questions."},
            {"role": "user", "content": "How are you today?"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chat_model(tmp_path_factory.mktemp("model") / "chat-atlas")


@pytest.fixture(scope="module")
def server(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("srv"), {"ATLAS_MODEL": str(folder)}) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def local(folder: Path) -> Atlas:
    return Atlas.load(folder, device="cpu")


def test_chat_streams_role_content_finish_and_usage(client, local) -> None:
    chunks = list(client.chat.completions.create(model="chat-atlas", messages=MESSAGES, max_tokens=12,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.finish_reason is None
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model="chat-atlas", messages=MESSAGES, max_tokens=12,
                                           temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == text
    assert whole.usage is not None and whole.usage.model_dump() == chunks[-1].usage.model_dump()


def test_prompt_is_the_templates_rendering(client, local) -> None:
    """The server's prompt is the ChatML reference rendering: same token count, same greedy answer as
    the same model given that text in process (it stops at <|im_end|>, the eos_token)."""
    r = client.chat.completions.create(model="chat-atlas", messages=MESSAGES, max_tokens=24, temperature=0)
    prompt = chatml_reference(MESSAGES)
    ids = local.encode(prompt)
    assert r.usage is not None and r.usage.prompt_tokens == len(ids)
    gen = local.generate(local.new_state(), ids, SamplingParams(max_tokens=24, temperature=0))
    answer = "".join(t.text for t in gen)
    assert r.choices[0].message.content == answer
    assert r.choices[0].finish_reason == gen.finish_reason


def test_text_parts_join_with_newlines(client) -> None:
    parts = [{"type": "text", "text": "How are"}, {"type": "text", "text": "you today?"}]
    a = client.chat.completions.create(model="chat-atlas", max_tokens=6, temperature=0,
                                       messages=[{"role": "user", "content": parts}])
    b = client.chat.completions.create(model="chat-atlas", max_tokens=6, temperature=0,
                                       messages=[{"role": "user", "content": "How are\nyou today?"}])
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage == b.usage


def test_n_choices_and_seeds_on_chat(client) -> None:
    kw = dict(model="chat-atlas", messages=MESSAGES, max_tokens=10, temperature=1.0, seed=5)
    a = client.chat.completions.create(n=3, **kw)
    b = client.chat.completions.create(n=3, **kw)
    texts = [c.message.content for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.message.content for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) == 3


def test_session_fork_and_commit(server, client) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        sid = c.post("/v1/sessions").json()["id"]
        r = c.post(f"/v1/sessions/{sid}/ingest", content="Hello there, the document. " * 4,
                   headers={"Content-Type": "text/plain"})
        assert parse_sse(r.text)[-1]["done"] is True
        before = c.get(f"/v1/sessions/{sid}").json()
        kw = dict(model="chat-atlas", messages=MESSAGES, max_tokens=5, temperature=0)
        forked = client.chat.completions.create(extra_body={"session_id": sid}, **kw)
        assert c.get(f"/v1/sessions/{sid}").json()["tokens"] == before["tokens"]  # a fork
        committed = client.chat.completions.create(extra_body={"session_id": sid, "commit": True}, **kw)
        assert committed.choices[0].message.content == forked.choices[0].message.content
        after = c.get(f"/v1/sessions/{sid}").json()
        assert committed.usage is not None
        # The held-back end of the document is fed first, then the turn and the answer.
        assert after["tokens"] >= before["tokens"] + committed.usage.total_tokens
        assert after["generation"] > before["generation"]
        r = c.post("/v1/chat/completions", json={**kw, "commit": True})
        assert r.status_code == 400 and "commit" in r.json()["error"]["message"]


def test_template_errors_and_bad_parts_are_400(server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "tool", "content": "x"}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "chat_template_error"
        assert "Unknown role: tool" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:,"}}]}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"
        assert "messages[0].content" in r.json()["error"]["message"]
        no_text = [{"role": "user", "content": [{"type": "text"}]}]
        r = c.post("/v1/chat/completions", json={"messages": no_text})
        assert r.status_code == 422 and "needs its `text`" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"messages": []})
        assert r.status_code == 422


def test_edges_of_the_sampling_fields(server, client) -> None:
    """Values at the edges get their documented answer, never a 500 or another field's error."""
    r = client.chat.completions.create(model="chat-atlas", messages=MESSAGES, max_completion_tokens=0)
    assert r.usage is not None and r.usage.completion_tokens == 0  # 0 is a value, not "unset"
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for route, body in (("completions", {"prompt": "x"}), ("chat/completions", {"messages": MESSAGES})):
            for bias in ({"²": 5}, {"٣": 5}, {"-1": 5}, {"1.0": 5}):  # digits Python knows, ids it does not
                r = c.post(f"/v1/{route}", json={**body, "max_tokens": 1, "logit_bias": bias})
                assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter", r.text
            for penalty in (1e-39, 0.0, 11.0):  # 1e-39 would overflow the logits to inf
                r = c.post(f"/v1/{route}", json={**body, "max_tokens": 1, "repetition_penalty": penalty})
                assert r.status_code == 422 and "repetition_penalty" in r.text, r.text
            # JSON allows a lone surrogate; the 404 that quotes it must still be UTF-8
            r = c.post(f"/v1/{route}", headers={"Content-Type": "application/json"},
                       content=b'{"max_tokens": 1, "session_id": "\\ud800", ' + (
                           b'"prompt": "x"}' if route == "completions" else
                           b'"messages": [{"role": "user", "content": "x"}]}'))
            assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found", r.text


def test_a_model_id_with_a_slash_is_found(folder, tmp_path) -> None:
    with running_server(tmp_path, {"ATLAS_MODEL": str(folder), "ATLAS_MODEL_ID": "acme/chat-atlas"}) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        assert client.models.retrieve("acme/chat-atlas").id == "acme/chat-atlas"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("acme/other")


# -- refused parameters ------------------------------------------------------------------------------

REFUSED = [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "auto"), ("functions", [{"name": "f"}]), ("function_call", "auto"),
    ("response_format", {"type": "json_object"}), ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]), ("prediction", {"type": "content", "content": "x"}),
    ("parallel_tool_calls", True), ("guided_json", {"type": "object"}), ("guided_regex", "a+"),
    ("guided_choice", ["a", "b"]), ("guided_grammar", "root ::= 'a'"), ("use_beam_search", True),
    ("best_of", 2), ("min_tokens", 3), ("ignore_eos", True), ("stop_token_ids", [1]),
    ("structured_outputs", {"json": {}}), ("reasoning_effort", "low"), ("store", True),
]


@pytest.mark.parametrize("route", ["chat", "completions"])
@pytest.mark.parametrize(("field", "value"), REFUSED + [("suffix", "tail")], ids=lambda x: str(x)[:20])
def test_unsupported_parameters_are_refused_by_name(server, route, field, value) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]} if route == "chat" else {"prompt": "hi"}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.post(f"/v1/{'chat/completions' if route == 'chat' else 'completions'}",
                   json={**body, "max_tokens": 1, field: value})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "unsupported_parameter" and field in err["message"]
        # The neutral values some clients always send, and fields nobody knows, pass.
        ok = c.post(f"/v1/{'chat/completions' if route == 'chat' else 'completions'}",
                    json={**body, "max_tokens": 1, "response_format": {"type": "text"}, "tools": [],
                          "use_beam_search": False, "best_of": 1, "some_future_field": {"x": 1}})
        assert ok.status_code == 200, ok.text


def test_other_refusals(client) -> None:
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="chat-atlas", messages=MESSAGES, max_tokens=1, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="continuous_usage_stats"):
        client.completions.create(model="chat-atlas", prompt="x", max_tokens=1, stream=True,
                                  stream_options={"include_usage": True, "continuous_usage_stats": True})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="another-model", messages=MESSAGES, max_tokens=1)


def test_special_tokens_are_text_in_prompts_echoes_and_detokenize(server) -> None:
    """A prompt's special tokens are part of its text: the echo's offsets count them, token-id
    prompts echo them, and /detokenize gives /tokenize's text back (as vLLM's)."""
    with httpx.Client(base_url=server.url, timeout=30) as c:
        prompt = "a<|endoftext|>bcd"
        body = {"max_tokens": 2, "echo": True, "logprobs": 0, "temperature": 0}
        r = c.post("/v1/completions", json={**body, "prompt": prompt}).json()["choices"][0]
        tokens, offsets = r["logprobs"]["tokens"], r["logprobs"]["text_offset"]
        assert r["text"].startswith(prompt) and "".join(tokens) == r["text"]
        assert offsets == [sum(map(len, tokens[:i])) for i in range(len(tokens))]
        ids = c.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
        by_id = c.post("/v1/completions", json={**body, "prompt": [ids]}).json()["choices"][0]
        assert by_id["text"] == r["text"] and by_id["logprobs"]["text_offset"] == offsets
        assert c.post("/detokenize", json={"tokens": ids}).json()["prompt"] == prompt
