"""The engine around the model: tokenizers, checkpoints, sampling, generation and state bytes.

These are the parts clients touch directly (text in and out, saved states, shipped checkpoints), so
their failure modes must be refusals with the right error, never silent misbehaviour."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save as st_save

from atlas.engine import (
    Atlas,
    ByteTokenizer,
    ForeignStateError,
    SamplingParams,
    SessionState,
    StateError,
    StateFormatError,
    fingerprint,
    load_checkpoint,
    load_tokenizer,
    save_checkpoint,
)
from atlas.engine.sampling import StopMatcher, sample
from atlas.engine.state import FORMAT
from atlas.engine.tokenizer import HFTokenizer

from .helpers import same_session, tiny_atlas

# No example database: it would leave a .hypothesis folder in the working tree.
FAST = settings(max_examples=60, deadline=None, database=None)

SENTENCES = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog", "où est le café ?"]


def fed(atlas: Atlas, n: int, seed: int = 0) -> SessionState:
    toks = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return atlas.feed(atlas.new_state(), toks)[0]


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


@FAST
@given(st.text())
def test_byte_tokenizer_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


@FAST
@given(st.text())
def test_byte_stream_decoder_byte_by_byte(text: str) -> None:
    tok = ByteTokenizer()
    dec = tok.stream_decoder()
    assert "".join(dec.push(i) for i in tok.encode(text)) == text


@pytest.mark.parametrize("char", ["é", "€", "🐈"])
def test_byte_stream_decoder_holds_partial_character(char: str) -> None:
    dec = ByteTokenizer().stream_decoder()
    data = char.encode()
    assert len(data) > 1
    assert [dec.push(b) for b in data[:-1]] == [""] * (len(data) - 1)
    assert dec.push(data[-1]) == char
    assert dec.push(ord("x")) == "x"


def word_level_json(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tok.save(str(path / "tokenizer.json"))
    return path


def byte_bpe_json(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    tok.save(str(path / "tokenizer.json"))
    return path


def test_load_tokenizer_picks_tokenizer_json(tmp_path: Path) -> None:
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    tok = load_tokenizer(word_level_json(tmp_path))
    assert isinstance(tok, HFTokenizer)
    assert 5 < tok.vocab_size < 256
    ids = tok.encode("the dog sat on the mat")
    assert len(ids) == 6 and tok.decode(ids) == "the dog sat on the mat"
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert pieces[:2] == ["the", " dog"] and "".join(pieces) == tok.decode(ids)


def test_hf_stream_decoder_holds_partial_character(tmp_path: Path) -> None:
    """A byte-level BPE splits an unseen character over byte tokens; none of it leaks as U+FFFD."""
    tok = load_tokenizer(byte_bpe_json(tmp_path))
    assert isinstance(tok, HFTokenizer)
    text = "the café 🐈 sat"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # the cat emoji takes several tokens


def test_atlas_load_uses_checkpoint_tokenizer(atlas: Atlas, tmp_path: Path) -> None:
    save_checkpoint(atlas.model, tmp_path)
    assert isinstance(Atlas.load(tmp_path, device="cpu").tokenizer, ByteTokenizer)
    word_level_json(tmp_path)
    loaded = Atlas.load(tmp_path, device="cpu")
    assert isinstance(loaded.tokenizer, HFTokenizer)
    assert loaded.decode(loaded.encode("a cat sat")) == "a cat sat"


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def test_checkpoint_round_trip(atlas: Atlas, tmp_path: Path) -> None:
    save_checkpoint(atlas.model, tmp_path, extra={"training": {"note": "test"}})
    assert json.loads((tmp_path / "config.json").read_text())["training"] == {"note": "test"}
    model = load_checkpoint(tmp_path)
    assert fingerprint(model) == atlas.fingerprint
    loaded = Atlas(model)
    toks = list(range(40, 77))
    s1, l1 = atlas.feed(atlas.new_state(), toks, all_logits=True)
    s2, l2 = loaded.feed(loaded.new_state(), toks, all_logits=True)
    assert torch.equal(l1, l2)
    assert atlas.save_state(s1) == loaded.save_state(s2)
    # A state saved under one copy of the model loads under the other.
    assert loaded.load_state(atlas.save_state(s1)).equal(s2)


def test_checkpoint_bf16_casts_weights(atlas: Atlas, tmp_path: Path) -> None:
    full, half = tmp_path / "fp32", tmp_path / "bf16"
    save_checkpoint(atlas.model, full)
    save_checkpoint(atlas.model, half, dtype=torch.bfloat16)
    with safe_open(str(half / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert (half / "model.safetensors").stat().st_size < 0.6 * (full / "model.safetensors").stat().st_size
    model = load_checkpoint(half, dtype=torch.float32)
    for name, t in atlas.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], t.to(torch.bfloat16).float()), name
    assert fingerprint(model) != atlas.fingerprint  # rounded weights are another model


def edit_config(path: Path, **changes: object) -> None:
    doc = json.loads((path / "config.json").read_text())
    doc.update(changes)  # config.json is flat (docs/formats.md, "Checkpoint folder")
    (path / "config.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("changes", [{"n_layers": 3}, {"n_layers": 1}, {"mem_depth": 1}, {"layers": ["swa"]}],
                         ids=["more-layers", "fewer-layers", "depth", "mixer"])
def test_checkpoint_config_mismatch_refused(atlas: Atlas, tmp_path: Path, changes: dict) -> None:
    save_checkpoint(atlas.model, tmp_path)
    edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match="does not match"):
        load_checkpoint(tmp_path)


def test_checkpoint_shape_mismatch_refused(atlas: Atlas, tmp_path: Path) -> None:
    save_checkpoint(atlas.model, tmp_path)
    edit_config(tmp_path, d_model=64)
    # torch's load_state_dict raises RuntimeError on a size mismatch even with strict=False.
    with pytest.raises((ValueError, RuntimeError)):
        load_checkpoint(tmp_path)


def test_checkpoint_untied_without_head_refused(atlas: Atlas, tmp_path: Path) -> None:
    save_checkpoint(atlas.model, tmp_path)  # a tied model: no head.weight in the file
    edit_config(tmp_path, tie_embeddings=False)
    with pytest.raises(ValueError):
        load_checkpoint(tmp_path)


def test_checkpoint_float64_round_trip(tmp_path: Path) -> None:
    a64 = tiny_atlas(torch.float64)
    with torch.no_grad():
        a64.model.embed.weight.add_(1e-12)  # not representable in fp32
    save_checkpoint(a64.model, tmp_path)
    assert fingerprint(load_checkpoint(tmp_path, dtype=torch.float64)) == fingerprint(a64.model)


def test_fingerprint_changes_with_one_weight(atlas: Atlas) -> None:
    model = copy.deepcopy(atlas.model)
    assert fingerprint(model) == atlas.fingerprint
    with torch.no_grad():
        model.blocks[1].mixer.mem.w2_init[0, 3, 5] += 1e-6
    assert fingerprint(model) != atlas.fingerprint
    other = tiny_atlas(torch.float32, alpha_bias_init=5.0)  # same weights but one gate bias
    assert other.fingerprint != atlas.fingerprint


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def random_logits(seed: int, v: int = 256) -> torch.Tensor:
    return torch.randn(v, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(top_k=1), dict(top_k=1, temperature=5.0),
                                    dict(temperature=0.0, top_p=0.5, seed=3)])
def test_greedy_is_argmax(params: dict) -> None:
    p = SamplingParams(**params)
    assert p.greedy
    for seed in range(20):
        logits = random_logits(seed)
        assert sample(logits, p, p.generator()) == int(logits.argmax())
    assert sample(random_logits(0).double(), p) == int(random_logits(0).argmax())


def test_tiny_top_p_is_greedy() -> None:
    p = SamplingParams(temperature=1.0, top_p=1e-6, seed=0)
    assert not p.greedy
    gen = p.generator()
    for seed in range(50):
        logits = random_logits(seed)
        assert sample(logits, p, gen) == int(logits.argmax())


def test_top_k_keeps_top_tokens() -> None:
    p = SamplingParams(temperature=2.0, top_k=3, seed=1)
    gen = p.generator()
    logits = random_logits(7)
    top = set(torch.topk(logits, 3).indices.tolist())
    assert {sample(logits, p, gen) for _ in range(200)} == top


def test_top_p_keeps_the_nucleus() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = SamplingParams(top_p=0.7, seed=2)
    gen = p.generator()
    assert {sample(logits, p, gen) for _ in range(300)} == {0, 1}


def test_sampling_params_validation() -> None:
    for bad in (dict(stop=[""]), dict(stop=""), dict(stop=["ok", ""]), dict(max_tokens=-1),
                dict(temperature=-0.5), dict(top_p=0.0), dict(top_k=-1), dict(unknown=1)):
        with pytest.raises(ValidationError):
            SamplingParams(**bad)
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams(stop=None).stop == []


def run_stops(stops: list[str], pieces: list[str]) -> str:
    m = StopMatcher(stops)
    return "".join(m.push(p) for p in pieces) + m.flush()


def test_stop_matcher_cuts_stop_strings() -> None:
    assert run_stops(["END"], ["hello END world"]) == "hello "
    assert run_stops(["END"], ["hello E", "N", "D world"]) == "hello "
    assert run_stops(["END"], ["ab", "cEN"]) == "abcEN"  # a held prefix is emitted by flush
    assert run_stops(["\n\n", "###"], ["a\n", "b##", "#c\n\nd"]) == "a\nb"
    assert run_stops(["aab"], list("aaab")) == "a"


def test_stop_matcher_releases_false_prefixes() -> None:
    m = StopMatcher(["END"])
    assert m.push("abE") == "ab"  # "E" could start "END": held back
    assert m.push("N") == ""
    assert m.push("X") == "ENX"  # it did not: emitted
    assert not m.stopped
    assert m.push("END") == "" and m.stopped
    assert m.push("more") == "" and m.flush() == ""


@FAST
@given(st.text(alphabet="abc", max_size=40), st.text(alphabet="abc", min_size=1, max_size=4),
       st.randoms(use_true_random=False))
def test_stop_matcher_any_cut(text: str, stop: str, rng: random.Random) -> None:
    """However the text is cut into pushes, the output is the text up to the first stop string."""
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, max(0, len(text) - 1)))) if text else []
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    want = text[:text.index(stop)] if stop in text else text
    assert run_stops([stop], pieces) == want


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def test_generate_length(atlas: Atlas) -> None:
    prompt = "Hello, world"
    gen = atlas.generate(atlas.new_state(), prompt, SamplingParams(max_tokens=7, temperature=0))
    toks = list(gen)
    assert gen.finish_reason == "length"
    assert len(toks) == len(gen.token_ids) == 7
    assert [t.id for t in toks] == gen.token_ids
    assert "".join(t.text for t in toks) == gen.text == atlas.decode(gen.token_ids)
    assert gen.state.tokens == [len(atlas.encode(prompt)) + 7]
    # The state after generation is the prompt and the generated tokens fed in one go.
    direct, _ = atlas.feed(atlas.new_state(), atlas.encode(prompt) + gen.token_ids)
    assert same_session(gen.state, direct)  # logits of a decoded token: within rounding

    empty = atlas.generate(atlas.new_state(), prompt, SamplingParams(max_tokens=0))
    assert list(empty) == [] and empty.finish_reason == "length"


def test_generate_seeds(atlas: Atlas) -> None:
    prompt = atlas.feed(atlas.new_state(), atlas.encode("Once"))[0]

    def ids(**params: object) -> list[int]:
        gen = atlas.generate(prompt, None, SamplingParams(max_tokens=12, **params))
        list(gen)
        return gen.token_ids

    seven = ids(temperature=1.0, seed=7)
    assert ids(temperature=1.0, seed=7) == seven
    assert ids(temperature=1.0, seed=8) != seven
    assert ids(temperature=1.0, top_p=1e-6, seed=7) == ids(temperature=0.0)


def test_generate_stop(atlas: Atlas) -> None:
    params = dict(max_tokens=40, temperature=1.0, seed=2)
    first = atlas.generate(atlas.new_state(), "Once", SamplingParams(**params))
    list(first)
    text = first.text
    assert len(text) > 8
    stop = text[len(text) // 2:len(text) // 2 + 3]  # likely spans tokens: cut across pushes
    want = text[:text.index(stop)]

    gen = atlas.generate(atlas.new_state(), "Once", SamplingParams(**params, stop=[stop]))
    toks = list(gen)
    assert gen.finish_reason == "stop"
    assert gen.text == "".join(t.text for t in toks) == want
    assert stop not in gen.text
    assert gen.token_ids == first.token_ids[:len(gen.token_ids)] and len(gen.token_ids) < 40
    assert gen.state.tokens == [len(atlas.encode("Once")) + len(gen.token_ids)]


def test_generate_on_fork_leaves_parent(atlas: Atlas) -> None:
    parent = fed(atlas, 29)
    before = atlas.save_state(parent)
    gen = atlas.generate(parent.fork(), "More text", SamplingParams(max_tokens=12, seed=1))
    list(gen)
    assert atlas.save_state(parent) == before
    assert parent.tokens == [29] and gen.state.tokens == [29 + 9 + 12]
    # Generating from the parent itself (no explicit fork) leaves it alone too: states are values.
    gen2 = atlas.generate(parent, "More text", SamplingParams(max_tokens=12, seed=1))
    list(gen2)
    assert atlas.save_state(parent) == before
    assert gen2.token_ids == gen.token_ids


def test_generate_refuses_batches(atlas: Atlas) -> None:
    with pytest.raises(ValueError):
        atlas.generate(atlas.new_state(batch=2), "x")


# ---------------------------------------------------------------------------------------------
# State bytes
# ---------------------------------------------------------------------------------------------


def state_bytes_with_manifest(atlas: Atlas, state: SessionState, manifest: str) -> bytes:
    tensors = {k: v.contiguous().cpu() for k, v in state.tensors.items()}
    return st_save(tensors, metadata={"atlas": manifest})


@pytest.mark.parametrize("garbage", [b"", b"abc", b"\x00" * 8, b"\xff" * 64, b"{}" * 10,
                                     b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}       "])
def test_from_bytes_refuses_garbage(atlas: Atlas, garbage: bytes) -> None:
    with pytest.raises(StateFormatError):
        SessionState.from_bytes(garbage)
    with pytest.raises(StateFormatError):
        atlas.load_state(garbage)


@FAST
@given(st.binary(max_size=300))
def test_from_bytes_refuses_random_bytes(garbage: bytes) -> None:
    with pytest.raises(StateError):
        SessionState.from_bytes(garbage)


def test_from_bytes_refuses_truncated(atlas: Atlas) -> None:
    data = atlas.save_state(fed(atlas, 20))
    for n in (4, 8, 9, 100, len(data) // 2, len(data) - 1):
        with pytest.raises(StateFormatError):
            atlas.load_state(data[:n])


def test_from_bytes_refuses_foreign_model(atlas: Atlas) -> None:
    other = tiny_atlas(torch.float32, seed=1)
    data = other.save_state(fed(other, 20))
    with pytest.raises(ForeignStateError) as err:
        atlas.load_state(data)
    assert err.value.code == "foreign_model"
    # Without an expected fingerprint the bytes parse, and keep their model.
    assert SessionState.from_bytes(data).fingerprint == other.fingerprint
    with pytest.raises(ForeignStateError):
        SessionState.stack([fed(atlas, 3), fed(other, 3)])
    with pytest.raises(ValueError):
        atlas.feed(fed(other, 3), [1, 2])


def test_from_bytes_refuses_wrong_format(atlas: Atlas) -> None:
    state = fed(atlas, 20)
    for fmt in ("atlas-state/0", "atlas-state/2", None):
        manifest = json.dumps({"format": fmt, "fingerprint": atlas.fingerprint})
        with pytest.raises(StateFormatError) as err:
            atlas.load_state(state_bytes_with_manifest(atlas, state, manifest))
        assert err.value.code == "state_corrupt"
    no_meta = st_save({k: v.contiguous() for k, v in state.tensors.items()})
    with pytest.raises(StateFormatError):
        atlas.load_state(no_meta)
    right = json.dumps({"format": FORMAT, "fingerprint": atlas.fingerprint})
    assert atlas.load_state(state_bytes_with_manifest(atlas, state, right)).equal(state)


@pytest.mark.parametrize("manifest", ["1", "[]", "\"atlas-state/1\""])
def test_from_bytes_refuses_non_object_manifest(atlas: Atlas, manifest: str) -> None:
    with pytest.raises(StateFormatError):
        atlas.load_state(state_bytes_with_manifest(atlas, fed(atlas, 5), manifest))


def test_from_bytes_refuses_non_string_fingerprint(atlas: Atlas) -> None:
    manifest = json.dumps({"format": FORMAT, "fingerprint": 5})
    with pytest.raises(StateFormatError):
        atlas.load_state(state_bytes_with_manifest(atlas, fed(atlas, 5), manifest))


def test_load_state_refuses_missing_tensor(atlas: Atlas) -> None:
    state = fed(atlas, 20)
    tensors = {k: v for k, v in state.tensors.items() if k != "layers.1.mem.W1"}
    with pytest.raises(StateError):
        atlas.load_state(SessionState(tensors, atlas.fingerprint).to_bytes())


def test_to_bytes_is_deterministic(atlas: Atlas) -> None:
    state = fed(atlas, 37)
    data = state.to_bytes()
    assert data == state.to_bytes() == atlas.save_state(state)
    assert fed(atlas, 37).to_bytes() == data  # equal states made twice are equal bytes
    assert fed(atlas, 37, seed=1).to_bytes() != data
    restored = atlas.load_state(data)
    assert restored.equal(state) and restored.to_bytes() == data


def test_stack_split_round_trip(atlas: Atlas) -> None:
    singles = [fed(atlas, n, seed=n) for n in (0, 5, 13, 24)]
    batch = SessionState.stack(singles)
    assert batch.batch_size == 4 and batch.tokens == [0, 5, 13, 24]
    parts = batch.split()
    assert len(parts) == 4
    for part, single in zip(parts, singles, strict=True):
        assert part.equal(single)
        assert part.to_bytes() == single.to_bytes()
    assert SessionState.stack(parts).equal(batch)
    assert atlas.load_state(atlas.save_state(batch)).equal(batch)
    with pytest.raises(ValueError):
        SessionState.stack([])


def test_tiny_temperature_is_greedy(atlas: Atlas) -> None:
    logits = torch.randn(256)
    assert sample(logits, SamplingParams(temperature=1e-205)) == int(logits.argmax())


def test_top_p_that_underflows_keeps_the_best_token(atlas: Atlas) -> None:
    logits = torch.randn(256)
    assert sample(logits, SamplingParams(top_p=2.2250738585072014e-308, top_k=10**6)) == int(logits.argmax())


def test_feed_takes_integer_ids_only(atlas: Atlas) -> None:
    """A float is no token id (torch would truncate 1.5 to 1); nor is a position before the start."""
    state = atlas.new_state()
    for bad in ([1.5, 2.7], [True], torch.tensor([1.0])):
        with pytest.raises(TypeError, match="integers"):
            atlas.feed(state, bad)
    with pytest.raises(ValueError, match="out of the vocabulary"):
        atlas.feed(state, [atlas.config.vocab_size])
    assert atlas.feed(state, [])[0].tokens[0] == 0 and atlas.feed(state, torch.tensor([1], dtype=torch.uint8))
    with pytest.raises(ValueError, match="position"):
        atlas.new_state(position=-5)
