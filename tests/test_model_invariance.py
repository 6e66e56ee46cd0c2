"""Streaming invariance (docs/model.md, "The streaming-invariance contract"): however the stream is
cut, batched or saved, the logits and the final state are the same."""

from __future__ import annotations

import random

import pytest
import torch

from atlas.engine import Atlas, SessionState
from atlas.engine.state import is_cache_key

from .helpers import same_session, tiny_atlas

# The contract's tolerances (docs/model.md), as norm-relative errors: Newton-Schulz amplifies rounding
# along small singular directions, so single tiny elements may differ more than the whole does.
TOL = {torch.float64: 1e-5, torch.float32: 1e-4}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert actual.shape == expected.shape, what
    err = (actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12)
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.0e}"


def feed_in_pieces(atlas: Atlas, state: SessionState, tokens: torch.Tensor, cuts: list[int]):
    outs = []
    for a, b in zip([0, *cuts], [*cuts, tokens.shape[1]], strict=True):
        state, logits = atlas.feed(state, tokens[:, a:b], all_logits=True)
        outs.append(logits)
    return state, torch.cat(outs, dim=1)


def assert_states_close(a: SessionState, b: SessionState, dtype: torch.dtype) -> None:
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        if is_cache_key(k):
            continue
        x, y = a.tensors[k], b.tensors[k]
        if x.is_floating_point():
            assert_close(x, y, dtype, k)
        else:
            assert torch.equal(x, y), k


CASES = [
    # (optimizer, omega window c, memory depth, mixer)
    ("muon", 3, 2, "mag"),
    ("momentum", 3, 2, "mag"),
    ("gd", 3, 2, "mag"),
    ("muon", 1, 2, "atlas"),
    ("muon", 11, 1, "atlas"),  # c > b: the Omega tail spans more than one chunk
    ("momentum", 4, 1, "mag"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "fp32"])
@pytest.mark.parametrize("optimizer,window,depth,mixer", CASES)
def test_streaming_invariance_cuts(dtype, optimizer, window, depth, mixer):
    atlas = tiny_atlas(dtype, optimizer=optimizer, omega_window=window, mem_depth=depth, layers=[mixer])
    length = 45  # not a multiple of the chunk size (8)
    tokens = torch.randint(0, 64, (1, length), generator=torch.Generator().manual_seed(1))
    whole_state, whole = atlas.feed(atlas.new_state(), tokens, all_logits=True)

    rng = random.Random(2)
    cuts = sorted(rng.sample(range(1, length), 7))
    cut_state, cut = feed_in_pieces(atlas, atlas.new_state(), tokens, cuts)
    tbt_state, tbt = feed_in_pieces(atlas, atlas.new_state(), tokens, list(range(1, length)))

    for other, other_state in ((cut, cut_state), (tbt, tbt_state)):
        assert_close(other, whole, dtype, "logits")
        assert_states_close(other_state, whole_state, dtype)
        # Chunks are computed on the absolute grid, so the recurrent state is in fact bit-exact.
        assert same_session(other_state, whole_state)
    assert whole_state.tokens == [length]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "fp32"])
def test_streaming_invariance_long_pieces(dtype):
    """Pieces longer than the attention query block and many chunks, with an odd remainder."""
    atlas = tiny_atlas(dtype, chunk_size=16, swa_window=32)
    atlas.max_piece = 100
    tokens = torch.randint(0, 64, (1, 1337), generator=torch.Generator().manual_seed(3))
    s1, l1 = atlas.feed(atlas.new_state(), tokens, all_logits=True)
    s2, l2 = feed_in_pieces(atlas, atlas.new_state(), tokens, [1, 17, 600, 601, 1100])
    assert_close(l2, l1, dtype, "logits")
    assert_states_close(s2, s1, dtype)
    assert same_session(s2, s1)


@pytest.mark.parametrize("prefix", [37, 40], ids=["mid-chunk", "chunk-boundary"])
def test_save_restore_invariance_token_by_token(prefix):
    """Restored, then decoded token by token (the decode-cache path), equals never saving."""
    atlas = tiny_atlas(torch.float32)
    tokens = torch.randint(0, 64, (1, 70), generator=torch.Generator().manual_seed(4))
    state, _ = atlas.feed(atlas.new_state(), tokens[:, :prefix])
    restored = atlas.load_state(atlas.save_state(state))
    for i in range(prefix, 70):
        state, a = atlas.feed(state, tokens[:, i:i + 1])
        restored, b = atlas.feed(restored, tokens[:, i:i + 1])
        assert_close(b, a, torch.float32, f"logits at {i}")
    assert same_session(restored, state)


def test_save_restore_invariance():
    atlas = tiny_atlas(torch.float32)
    tokens = torch.randint(0, 64, (1, 70), generator=torch.Generator().manual_seed(4))
    state, _ = atlas.feed(atlas.new_state(), tokens[:, :37])
    restored = atlas.load_state(atlas.save_state(state))
    assert restored.equal(state)
    a_state, a = atlas.feed(state, tokens[:, 37:], all_logits=True)
    b_state, b = atlas.feed(restored, tokens[:, 37:], all_logits=True)
    assert torch.equal(a, b)
    assert a_state.equal(b_state)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "fp32"])
def test_batch_invariance_three_sessions(dtype):
    """Three sessions at different positions within their chunks, fed together, equal each alone."""
    atlas = tiny_atlas(dtype)
    gen = torch.Generator().manual_seed(5)
    singles = []
    for prefix in (0, 5, 13):
        st, _ = atlas.feed(atlas.new_state(), torch.randint(0, 64, (1, prefix), generator=gen))
        singles.append(st)
    batch = SessionState.stack(singles)
    for step_len in (11, 1, 1, 20):
        toks = torch.randint(0, 64, (3, step_len), generator=gen)
        batch, batch_logits = atlas.feed(batch, toks, all_logits=True)
        for i in range(3):
            singles[i], logits = atlas.feed(singles[i], toks[i:i + 1], all_logits=True)
            assert_close(batch_logits[i:i + 1], logits, dtype, "logits")
    for i, single in enumerate(singles):
        assert_states_close(batch[i], single, dtype)


def test_fork_does_not_disturb_parent():
    atlas = tiny_atlas(torch.float32)
    parent, _ = atlas.feed(atlas.new_state(), list(range(20)))
    before = atlas.save_state(parent)
    child = parent.fork()
    child, _ = atlas.feed(child, list(range(30)))
    assert atlas.save_state(parent) == before
    assert child.tokens == [50] and parent.tokens == [20]


def test_rope_invariance_at_ten_million():
    """A sliding-window-only model sees only relative positions, even 10M tokens in."""
    atlas = tiny_atlas(torch.float32, layers=["swa"])
    tokens = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(6))
    _, at_zero = atlas.feed(atlas.new_state(position=0), tokens, all_logits=True)
    _, far = atlas.feed(atlas.new_state(position=10_000_000), tokens, all_logits=True)
    assert_close(far, at_zero, torch.float32, "logits")


def test_state_size_is_constant():
    atlas = tiny_atlas(torch.float32, chunk_size=64, swa_window=64, d_model=64)
    short, _ = atlas.feed(atlas.new_state(), [1] * 100)
    long, _ = atlas.feed(atlas.new_state(), torch.randint(0, 64, (20_000,)).tolist())
    assert len(atlas.save_state(short)) == len(atlas.save_state(long))
    assert short.nbytes == long.nbytes
    assert long.tokens == [20_000]


def test_ingest_runs_the_output_layer_only_for_the_last_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without all_logits a block where no session ends computes no logits, and the last logits are
    the bits that all_logits gives (the same block-shaped product makes them)."""
    atlas = tiny_atlas(torch.float32)
    tokens = torch.randint(0, 64, (2, 61), generator=torch.Generator().manual_seed(3))  # 7 chunks of 8, and 5
    _, every = atlas.feed(atlas.new_state(2), tokens, all_logits=True)
    calls = []
    real = type(atlas.model)._logits
    monkeypatch.setattr(type(atlas.model), "_logits", lambda self, x: calls.append(x.shape) or real(self, x))
    state, last = atlas.feed(atlas.new_state(2), tokens)
    assert len(calls) == 1  # the block holding the last tokens, not the seven before it
    assert torch.equal(last, every[:, -1])
    assert torch.equal(state.last_logits, every[:, -1])


def test_span_of_whole_chunks_equals_the_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunks every session commits run as one span, layer by layer (docs/model.md, "Streaming on
    the absolute chunk grid"): the bundled model at its real shapes (chunks of 64), two sessions at
    different offsets, reaches bit for bit the state that feeding chunk-sized pieces (one round per
    call) reaches, and the last logits of a span ending on a chunk boundary are the bits all_logits
    gives them."""
    from atlas.engine.model.memory import AtlasMemory

    atlas = Atlas.load(device="cpu")
    b = atlas.config.chunk_size
    gen = torch.Generator().manual_seed(6)
    prefix = torch.randint(0, 256, (1, 5), generator=gen)
    starts = [atlas.new_state(), atlas.feed(atlas.new_state(), prefix)[0]]  # offsets 0 and 5
    tokens = torch.randint(0, 256, (2, 7 * b + 3), generator=gen)

    rows: list[int] = []
    real = AtlasMemory.project
    monkeypatch.setattr(AtlasMemory, "project",
                        lambda self, x, tail: rows.append(x.shape[1]) or real(self, x, tail))
    whole, whole_logits = atlas.feed(SessionState.stack(starts), tokens, all_logits=True)
    assert 7 * b in rows  # one span of the seven chunks both sessions complete
    rows.clear()
    pieces, piece_logits = feed_in_pieces(atlas, SessionState.stack(starts), tokens,
                                          list(range(b, tokens.shape[1], b)))
    assert max(rows) == b  # every piece leaves the second session mid-chunk: rounds only
    assert same_session(pieces, whole)
    assert_close(piece_logits, whole_logits, torch.float32, "logits")

    single = tokens[:1, :4 * b]
    _, every = atlas.feed(atlas.new_state(), single, all_logits=True)
    state, last = atlas.feed(atlas.new_state(), single)
    assert torch.equal(last[0], every[0, -1])
    assert torch.equal(state.last_logits, every[:, -1])


def test_a_long_piece_runs_as_bounded_spans_with_the_bits_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A piece longer than a span may be (lm.SPAN_ELEMENTS) runs as several spans in a row, then the
    rounds, and reaches bit for bit the state and logits of one span over it all."""
    from atlas.engine.model import lm
    from atlas.engine.model.memory import AtlasMemory

    atlas = Atlas.load(device="cpu")
    b, d = atlas.config.chunk_size, atlas.config.d_model
    gen = torch.Generator().manual_seed(8)
    tokens = torch.randint(0, 256, (2, 9 * b + 5), generator=gen)
    start = SessionState.stack([atlas.new_state(), atlas.feed(atlas.new_state(), tokens[:1, :3])[0]])

    rows: list[int] = []
    real = AtlasMemory.project
    monkeypatch.setattr(AtlasMemory, "project",
                        lambda self, x, tail: rows.append(x.shape[1]) or real(self, x, tail))
    one, one_logits = atlas.feed(start, tokens, all_logits=True)
    assert 9 * b in rows  # one span of the nine chunks both sessions complete
    rows.clear()
    monkeypatch.setattr(lm, "SPAN_ELEMENTS", 2 * 4 * b * d)  # four chunks of two sessions a span
    bounded, bounded_logits = atlas.feed(start, tokens, all_logits=True)
    assert rows[::atlas.config.n_layers] == [4 * b, 4 * b, b, 8]  # spans of 4 and 4, then the rounds
    assert same_session(bounded, one)
    assert torch.equal(bounded_logits, one_logits)


def test_a_span_is_whole_chunks_that_every_session_commits() -> None:
    atlas = tiny_atlas(torch.float32)
    mem = atlas.model.memories[0]
    b, d = atlas.config.chunk_size, atlas.config.d_model
    st = mem.init_state(2, torch.float32)
    x = torch.randn(2, 2 * b, d)
    with pytest.raises(ValueError, match="every session commits"):
        mem(x, st, torch.tensor([True, False]), torch.full((2,), 2 * b - 1))
    with pytest.raises(ValueError, match="every session commits"):
        mem(torch.randn(2, 2 * b + 3, d), st, torch.tensor([True, True]), torch.full((2,), 2 * b + 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_products_keep_a_rows_bits_whatever_the_row_count(dtype) -> None:
    """What spans need before they run on a GPU (they run on the CPU only, engine/model/lm.py): each
    of the default model's linear maps gives a chunk's rows the same bits in a product of one chunk
    as in a product of many."""
    from atlas.engine import ModelConfig

    model = Atlas.from_config(ModelConfig(), seed=0, device="cuda").model.to(dtype)
    gen = torch.Generator(device="cuda").manual_seed(7)
    b = model.cfg.chunk_size
    for name, layer in model.named_modules():
        if not isinstance(layer, torch.nn.Linear):
            continue
        for sessions, chunks in ((1, 2), (1, 64), (4, 8)):
            x = torch.randn(sessions, chunks * b, layer.in_features, device="cuda", generator=gen).to(dtype)
            whole = layer(x)
            for j in range(chunks):
                part = layer(x[:, j * b:(j + 1) * b].contiguous())  # as a round makes it
                assert torch.equal(whole[:, j * b:(j + 1) * b], part), (name, sessions, chunks, j)
