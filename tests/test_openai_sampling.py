"""Sampling beyond temperature/top-k/top-p (penalties, logit bias, min-p, seeds per choice), the
log-probabilities of tokens, the prompt log-probabilities of the Python API, and chat templates
rendered as transformers renders them: against hand computation, in process."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from atlas.engine import Atlas, SamplingParams
from atlas.engine.chat_template import PLAIN_TEMPLATE, ChatTemplateError, render_chat
from atlas.engine.sampling import Sampler, logprobs_of, sample, warp

from .helpers import tiny_atlas
from .openai_helpers import CHATML, SMALL, chatml_reference, reference_logprobs

LOGITS = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0])


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    s = Sampler(SamplingParams(repetition_penalty=2.0), 5, prompt=[0, 1])
    s.observe(4)
    # seen: 0 (prompt), 1 (prompt), 4 (generated); 2 and 3 untouched
    assert s.process(LOGITS).tolist() == [1.0, -2.0, 0.5, -3.0, 0.5]


def test_presence_and_frequency_penalties_count_generated_tokens_only() -> None:
    s = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), 5, prompt=[1, 2])
    for tok in (0, 0, 0, 3):
        s.observe(tok)
    # OpenAI: mu[j] - c[j] * frequency - (c[j] > 0) * presence
    want = [2.0 - 3 * 0.25 - 0.5, -1.0, 0.5, -3.0 - 0.25 - 0.5, 1.0]
    assert s.process(LOGITS).tolist() == pytest.approx(want, abs=1e-6)


def test_logit_bias_is_added_and_checked_against_the_vocabulary() -> None:
    s = Sampler(SamplingParams(logit_bias={1: 10.0, 3: -100.0}), 5)
    assert s.process(LOGITS).tolist() == pytest.approx([2.0, 9.0, 0.5, -103.0, 1.0])
    greedy = Sampler(SamplingParams(temperature=0, logit_bias={1: 10.0}), 5)
    assert greedy.sample(LOGITS)[0] == 1
    with pytest.raises(ValueError, match="vocabulary"):
        Sampler(SamplingParams(logit_bias={5: 1.0}), 5)
    for bad in ({1: 100.5}, {-1: 1.0}):
        with pytest.raises(ValidationError):
            SamplingParams(logit_bias=bad)


def test_min_p_keeps_tokens_within_the_ratio_of_the_top_one() -> None:
    p = SamplingParams(min_p=0.3, temperature=1.0)
    probs = torch.softmax(LOGITS, -1)
    keep = probs >= 0.3 * probs.max()  # by hand: 2.0, 1.0 (e^-1 = 0.37 >= 0.3); not 0.5 (e^-1.5 = 0.22)
    assert keep.tolist() == [True, False, False, False, True]
    assert torch.isfinite(warp(LOGITS, p)).tolist() == keep.tolist()
    gen = torch.Generator().manual_seed(0)
    assert {sample(LOGITS, p, gen) for _ in range(300)} == {0, 4}


def test_penalties_apply_before_the_draw() -> None:
    # Greedy with a frequency penalty: the top token loses its place once it has been generated.
    s = Sampler(SamplingParams(temperature=0, frequency_penalty=2.0), 5)
    # [2, -1, .5, -3, 1] -> 0; then 0 at 0.0 < 1.0 -> 4; then 4 at -1.0: [0, -1, .5, -3, -1] -> 2
    assert [s.sample(LOGITS)[0] for _ in range(3)] == [0, 4, 2]


def test_each_choice_has_its_own_seed() -> None:
    p = SamplingParams(seed=11, temperature=1.0)
    logits = torch.randn(64, generator=torch.Generator().manual_seed(3))

    def draws(index: int) -> list[int]:
        g = p.generator(index=index)
        return [sample(logits, p, g) for _ in range(20)]

    seed13 = torch.Generator().manual_seed(13)  # choice 2 of seed 11 draws as a request of seed 13
    assert draws(2) == [sample(logits, p, seed13) for _ in range(20)]
    assert draws(0) != draws(1)
    assert SamplingParams(seed=(1 << 64) - 1).generator(index=1) is not None  # wraps, no overflow


def test_logprobs_of_is_log_softmax_with_sorted_alternatives() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 4
    ids = [7, 0, 49]
    entries = logprobs_of(logits, ids, top=5)
    lp = torch.log_softmax(logits.double(), -1)
    for row, (tok, e) in enumerate(zip(ids, entries, strict=True)):
        assert e.id == tok and math.isclose(e.logprob, float(lp[row, tok]), abs_tol=1e-5)
        values = [v for _, v in e.top]
        assert values == sorted(values, reverse=True) and len(values) == 5
        assert [t for t, _ in e.top] == torch.topk(lp[row], 5).indices.tolist()
        for t, v in e.top:
            assert math.isclose(v, float(lp[row, t]), abs_tol=1e-5)


def test_sampled_token_logprob_is_of_the_raw_logits() -> None:
    # Temperature and penalties change the draw, never the reported log-probability.
    p = SamplingParams(temperature=0.3, presence_penalty=1.0, seed=0, logprobs=3)
    tok, entry = Sampler(p, 5).sample(LOGITS)
    assert entry is not None and entry.id == tok
    assert math.isclose(entry.logprob, float(torch.log_softmax(LOGITS, -1)[tok]), abs_tol=1e-6)
    assert [t for t, _ in entry.top] == [0, 4, 2]


def test_prompt_logprobs_match_feeding_token_by_token() -> None:
    atlas = tiny_atlas(torch.float32, **SMALL)
    ids = list(b"The quick brown fox jumps over the lazy dog, twice.")  # crosses six chunks of 8
    ref, dists = reference_logprobs(atlas, ids)
    state, got = atlas.prompt_logprobs(atlas.new_state(), ids, top=4)
    assert got[0] is None and ref[0] is None
    for k in range(1, len(ids)):
        e = got[k]
        assert e is not None and abs(e.logprob - (ref[k] or 0.0)) < 1e-5
        assert [t for t, _ in e.top] == torch.topk(dists[k], 4).indices.tolist()
    # After a document: the first token has its log-probability too, from the document's last logits.
    doc, _ = atlas.feed(atlas.new_state(), list(b"a document of some length"))
    ref2, _ = reference_logprobs(atlas, ids[:12], doc)
    _, got2 = atlas.prompt_logprobs(doc, ids[:12])
    assert all(e is not None and abs(e.logprob - (r or 0.0)) < 1e-5 for e, r in zip(got2, ref2, strict=True))
    assert int(state.tokens[0]) == len(ids)


def test_generate_honours_penalties_and_logprobs() -> None:
    atlas = tiny_atlas(torch.float32, **SMALL)
    greedy = SamplingParams(max_tokens=12, temperature=0)
    plain = [t.id for t in atlas.generate(atlas.new_state(), "abc", greedy)]
    assert len(set(plain)) < len(plain)  # greedy repeats itself...
    p = SamplingParams(max_tokens=12, temperature=0, presence_penalty=2.0, repetition_penalty=10.0,
                       logprobs=2)
    toks = list(atlas.generate(atlas.new_state(), "abc", p))
    ids = [t.id for t in toks]
    assert not set(ids) & set(b"abc") and len(set(ids)) == len(ids)  # ...not under the penalties
    assert all(t.logprob is not None and t.logprob.id == t.id for t in toks)
    with pytest.raises(ValueError):
        atlas.generate(atlas.new_state(), "abc", SamplingParams(n=2))


# -- chat templates -------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Be <brief> & kind."},
            {"role": "user", "content": "Où est la gare ?", "name": "Zoë \"Z\""},
            {"role": "assistant", "content": "Tout droit."}, {"role": "user", "content": "Merci"}]
SPECIALS = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}


def test_chat_template_renders_as_transformers_does() -> None:
    assert render_chat(MESSAGES, CHATML, SPECIALS) == chatml_reference(MESSAGES)


def test_plain_template_for_models_without_one() -> None:
    got = render_chat(MESSAGES[:2], None)
    assert got == render_chat(MESSAGES[:2], PLAIN_TEMPLATE)
    assert got == "<|system|>\nBe <brief> & kind.\n<|user|>\nOù est la gare ?\n<|assistant|>\n"


def test_template_errors_carry_a_stable_code() -> None:
    with pytest.raises(ChatTemplateError, match="Unknown role: tool") as e:
        render_chat([{"role": "tool", "content": "x"}], CHATML, SPECIALS)
    assert e.value.code == "chat_template_error"
    with pytest.raises(ChatTemplateError, match="compile"):
        render_chat(MESSAGES, "{% for m in messages %}", SPECIALS)
    with pytest.raises(ChatTemplateError, match="ZeroDivisionError"):  # the template's own arithmetic
        render_chat(MESSAGES, "{{ 1 // 0 }}", SPECIALS)
    # The sandbox refuses what a template must never do (here: reach Python internals).
    with pytest.raises(ChatTemplateError):
        render_chat(MESSAGES, "{{ messages.__class__.__mro__[1].__subclasses__() }}", SPECIALS)


def test_atlas_exposes_the_folders_template(tmp_path) -> None:
    from .openai_helpers import chat_model

    atlas = Atlas.load(chat_model(tmp_path / "chat"))
    assert atlas.chat_template == CHATML
    assert atlas.special_tokens == {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}
    assert atlas.eos_token_ids == (atlas.tokenizer.encode("<|im_end|>")[0],)
    prompt = render_chat(MESSAGES, atlas.chat_template, atlas.special_tokens)
    start = atlas.encode("<|im_start|>")
    assert len(start) == 1 and atlas.encode(prompt).count(start[0]) == len(MESSAGES) + 1  # special tokens
    # Byte-level BPE pieces of a character: the bytes of the piece, not U+FFFD.
    text = "Ça va très bien"
    assert b"".join(atlas.token_bytes(t) for t in atlas.encode(text)) == text.encode()
    assert Atlas(tiny_atlas(torch.float32).model).chat_template is None
