"""Log-probabilities, echo, n choices and seeds of the OpenAI routes, through a real server (an
``atlas serve`` process) and the official ``openai`` client, held against the same model computed in
process one token at a time. The server feeds one chunk per step (ATLAS_INGEST_CHUNKS_PER_STEP=1),
so prompts are scored across several pieces."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from atlas.engine import Atlas, SamplingParams
from bench.server_process import ServerProcess

from .openai_helpers import byte_model, reference_logprobs
from .server_helpers import parse_sse, running_server

TEXT = "The quick brown fox jumps over the lazy dog; it was not amused."  # 63 bytes: 8 chunks of 8
TOL = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return byte_model(tmp_path_factory.mktemp("model") / "byte-atlas")


@pytest.fixture(scope="module")
def server(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"ATLAS_MODEL": str(folder), "ATLAS_INGEST_CHUNKS_PER_STEP": "1"}
    with running_server(tmp_path_factory.mktemp("srv"), env) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def local(folder: Path) -> Atlas:
    return Atlas.load(folder, device="cpu")


def byte_ids(tokens: list[str]) -> list[int]:
    """The ids of the byte tokenizer's token texts ("a", or "bytes:\\xe2" for a piece of a character)."""
    out = []
    for t in tokens:
        if t.startswith("bytes:"):
            out += [int(h, 16) for h in t[len("bytes:"):].split("\\x") if h]
        else:
            out += list(t.encode())
    assert len(out) == len(tokens)
    return out


def check_tops(tops: list[dict[str, float] | None], n: int) -> None:
    for top in tops:
        if top is None:
            continue
        values = list(top.values())
        assert len(values) == n and values == sorted(values, reverse=True)


def test_echo_with_no_tokens_scores_the_prompt(client, local) -> None:
    r = client.completions.create(model="byte-atlas", prompt=TEXT, max_tokens=0, echo=True, logprobs=5)
    choice = r.choices[0]
    assert choice.text == TEXT and choice.finish_reason == "length"
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None
    assert lp.token_logprobs is not None and lp.top_logprobs is not None
    assert "".join(lp.tokens) == TEXT and lp.text_offset == list(range(len(TEXT)))
    ref, dists = reference_logprobs(local, list(TEXT.encode()))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert max(abs(g - r_) for g, r_ in zip(lp.token_logprobs[1:], ref[1:], strict=True)) < TOL
    check_tops(lp.top_logprobs, 5)
    for k in range(1, len(TEXT)):
        top = lp.top_logprobs[k]
        assert top is not None
        want = torch.topk(dists[k], 5)
        assert byte_ids(list(top)) == want.indices.tolist()
        assert all(abs(v - w) < TOL for v, w in zip(top.values(), want.values.tolist(), strict=True))
        if TEXT[k] in top:  # the token's own entry among the alternatives is the same number
            assert math.isclose(top[TEXT[k]], lp.token_logprobs[k], abs_tol=1e-6)
    assert r.usage is not None and r.usage.prompt_tokens == len(TEXT) and r.usage.completion_tokens == 0


def test_sampled_tokens_logprobs_are_the_models(client, local) -> None:
    r = client.completions.create(model="byte-atlas", prompt=TEXT[:21], max_tokens=12, temperature=0.9,
                                  seed=7, logprobs=5, echo=True)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None
    assert lp.token_logprobs is not None and lp.top_logprobs is not None
    ids = byte_ids(lp.tokens)
    assert ids[:21] == list(TEXT[:21].encode()) and len(ids) == 21 + 12
    ref, _ = reference_logprobs(local, ids)
    assert max(abs(g - r_) for g, r_ in zip(lp.token_logprobs[1:], ref[1:], strict=True)) < TOL
    check_tops(lp.top_logprobs, 5)
    # Without echo: the same tokens, the same numbers (one seed, one draw).
    again = client.completions.create(model="byte-atlas", prompt=TEXT[:21], max_tokens=12, temperature=0.9,
                                      seed=7, logprobs=5)
    lp2 = again.choices[0].logprobs
    assert lp2 is not None and lp2.token_logprobs is not None and lp2.text_offset is not None
    assert lp2.tokens == lp.tokens[21:] and lp2.token_logprobs == lp.token_logprobs[21:]
    assert r.choices[0].text == TEXT[:21] + again.choices[0].text
    assert lp2.text_offset[0] == 0


def test_streamed_logprobs_equal_the_whole_answer(server, client) -> None:
    whole = client.completions.create(model="byte-atlas", prompt="Once upon", max_tokens=10, temperature=1.0,
                                      seed=3, logprobs=2)
    tokens, values, text = [], [], ""
    for chunk in client.completions.create(model="byte-atlas", prompt="Once upon", max_tokens=10,
                                           temperature=1.0, seed=3, logprobs=2, stream=True):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None and c.logprobs.tokens:
                tokens += c.logprobs.tokens
                values += c.logprobs.token_logprobs or []
    assert whole.choices[0].logprobs is not None
    assert text == whole.choices[0].text and tokens == whole.choices[0].logprobs.tokens
    assert values == whole.choices[0].logprobs.token_logprobs


def test_n_choices_fork_one_prompt(client) -> None:
    kw = dict(model="byte-atlas", prompt="Hello", max_tokens=16, temperature=1.0)
    r = client.completions.create(n=3, **kw)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert len({c.text for c in r.choices}) == 3  # 256^16 answers: three draws never coincide
    assert r.usage is not None and r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 3 * 16
    seeded = [client.completions.create(n=3, seed=42, **kw) for _ in range(2)]
    texts = [[c.text for c in sorted(s.choices, key=lambda c: c.index)] for s in seeded]
    assert texts[0] == texts[1] and len(set(texts[0])) == 3
    # The documented rule: choice i draws as a request of seed + i.
    alone = [client.completions.create(seed=42 + i, **kw).choices[0].text for i in range(3)]
    assert alone == texts[0]


def test_n_choices_stream_each_with_its_index(client) -> None:
    texts = ["", ""]
    finish = {}
    usage = None
    for chunk in client.completions.create(model="byte-atlas", prompt="Hello", max_tokens=6, n=2, seed=1,
                                           temperature=1.0, stream=True,
                                           stream_options={"include_usage": True}):
        if not chunk.choices:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    whole = client.completions.create(model="byte-atlas", prompt="Hello", max_tokens=6, n=2, seed=1,
                                      temperature=1.0)
    assert texts == [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    assert finish == {0: "length", 1: "length"} and usage is not None and usage.completion_tokens == 12


def test_several_prompts_in_one_request(client, local) -> None:
    prompts = [list(b"abc def"), list(b"xyz")]
    r = client.completions.create(model="byte-atlas", prompt=prompts, max_tokens=0, echo=True, logprobs=1)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == ["abc def", "xyz"]
    for c, ids in zip(sorted(r.choices, key=lambda c: c.index), prompts, strict=True):
        ref, _ = reference_logprobs(local, ids)
        assert c.logprobs is not None and c.logprobs.token_logprobs is not None
        assert all(g is None and w is None or abs(g - w) < TOL
                   for g, w in zip(c.logprobs.token_logprobs, ref, strict=True))


def test_prompt_after_a_session_document(server, client, local) -> None:
    doc = b"A session holds a long document; questions come after it. " * 3
    with httpx.Client(base_url=server.url, timeout=30) as c:
        sid = c.post("/v1/sessions").json()["id"]
        r = c.post(f"/v1/sessions/{sid}/ingest", content=doc, headers={"Content-Type": "text/plain"})
        assert parse_sse(r.text)[-1]["done"] is True
        before = c.get(f"/v1/sessions/{sid}").json()["tokens"]
    r2 = client.completions.create(model="byte-atlas", prompt="Q: what?", max_tokens=0, echo=True, logprobs=1,
                                   extra_body={"session_id": sid})
    state, _ = local.feed(local.new_state(), list(doc))
    ref, _ = reference_logprobs(local, list(b"Q: what?"), state)
    got = r2.choices[0].logprobs.token_logprobs
    assert got is not None and got[0] is not None  # the document predicts the first token
    assert max(abs(g - w) for g, w in zip(got, ref, strict=True)) < TOL
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get(f"/v1/sessions/{sid}").json()["tokens"] == before  # a fork: the session is unchanged


def test_chat_logprobs_are_the_models(client, local) -> None:
    from atlas.engine.chat_template import render_chat

    messages = [{"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model="byte-atlas", messages=messages,
                                       max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert content is not None and len(content) == 8
    prompt = local.encode(render_chat(messages, None))
    answer = [e.bytes[0] for e in content]
    ref, dists = reference_logprobs(local, prompt + answer)
    for k, e in enumerate(content):
        assert abs(e.logprob - ref[len(prompt) + k]) < TOL
        values = [t.logprob for t in e.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert e.top_logprobs[0].bytes == e.bytes and values[0] == e.logprob  # greedy: the top one
        assert [t.bytes[0] for t in e.top_logprobs] == torch.topk(dists[len(prompt) + k], 3).indices.tolist()
    assert r.usage is not None and r.usage.prompt_tokens == len(prompt)
    # Streamed: the same entries, chunk by chunk.
    streamed = []
    for chunk in client.chat.completions.create(model="byte-atlas", messages=messages,
                                                max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
                                                stream=True):
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.content:
                streamed += c.logprobs.content
    assert [(e.bytes, e.logprob) for e in streamed] == [(e.bytes, e.logprob) for e in content]


def test_logit_bias_and_penalties_through_the_server(client) -> None:
    r = client.completions.create(model="byte-atlas", prompt="x", max_tokens=5, temperature=0,
                                  logit_bias={str(ord("A")): 100})
    assert r.choices[0].text == "AAAAA"
    # Biases far above the model's own logits (within about 1 of each other) decide every step:
    # A; then A pays 2 + 2 and falls under B; then B pays as much: A again.
    r = client.completions.create(model="byte-atlas", prompt="x", max_tokens=3, temperature=0,
                                  logit_bias={str(ord("A")): 100, str(ord("B")): 98}, frequency_penalty=2.0,
                                  presence_penalty=2.0)
    assert r.choices[0].text == "ABA"
    # The prompt's A is divided by 4 (7.5) and falls under C (10); C, once generated, under D (9);
    # D then under A.
    r = client.completions.create(model="byte-atlas", prompt="A", max_tokens=3, temperature=0,
                                  logit_bias={str(ord("A")): 30, str(ord("C")): 10, str(ord("D")): 9},
                                  extra_body={"repetition_penalty": 4.0})
    assert r.choices[0].text == "CDA"
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model="byte-atlas", prompt="x", max_tokens=1, logit_bias={"256": 1})


def test_sampling_params_map_one_to_one() -> None:
    """The server's fields all land in the engine's SamplingParams (the one definition)."""
    from atlas.server.routes.common import sampling
    from atlas.server.schemas import ChatCompletionRequest
    from atlas.server.settings import ServerSettings

    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], n=2, min_p=0.1,
                                presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.5,
                                logit_bias={"3": -5.0}, seed=9, top_k=4, top_p=0.9, temperature=0.7,
                                stop="x", max_tokens=5)
    got = sampling(req, 16, ServerSettings(), vocab_size=10, logprobs=2)
    assert got == SamplingParams(n=2, min_p=0.1, presence_penalty=0.5, frequency_penalty=0.25,
                                 repetition_penalty=1.5, logit_bias={3: -5.0}, seed=9, top_k=4, top_p=0.9,
                                 temperature=0.7, stop=["x"], max_tokens=5, logprobs=2)
