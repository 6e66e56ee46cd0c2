"""The worker's batching policy: `max_batch` caps every batch, and changes no result."""

from __future__ import annotations

import asyncio

import pytest
import torch

from atlas.engine import SamplingParams
from atlas.engine.runtime import GenerationDone, Runtime, RuntimeSettings
from atlas.engine.store import StoreSettings, open_store

from .helpers import tiny_atlas

GREEDY = SamplingParams(max_tokens=20, temperature=0)


async def _pieces(data: bytes, size: int):
    for i in range(0, len(data), size):
        yield data[i:i + size]


async def _session_answer(rt: Runtime, doc: bytes, prompt: str) -> list[int]:
    sid = (await rt.create_session("t")).id
    async for _ in rt.ingest(sid, "t", _pieces(doc, 50)):
        pass
    toks = []
    async for ev in rt.generate(sid, "t", prompt, GREEDY):
        if not isinstance(ev, GenerationDone):
            toks.append(ev.id)
    return toks


def _run_all(tmp_path, max_batch: int) -> tuple[list[list[int]], Runtime]:
    atlas = tiny_atlas(torch.float32, chunk_size=16, swa_window=32)
    store = open_store(StoreSettings(data_dir=tmp_path / f"store-{max_batch}"))
    rt = Runtime(atlas, store, RuntimeSettings(max_batch=max_batch, ingest_chunks_per_step=2))
    docs = [bytes([65 + i]) * (300 + 16 * i) for i in range(6)]

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(_session_answer(rt, d, f"q{i}") for i, d in enumerate(docs))))

    try:
        return asyncio.run(main()), rt
    finally:
        rt.close()
        store.close()


@pytest.mark.parametrize("max_batch", [1, 2])
def test_max_batch_caps_batches_and_changes_no_answer(tmp_path, max_batch):
    capped, rt = _run_all(tmp_path, max_batch)
    assert 1 <= rt.stats.peak_decode_batch <= max_batch
    assert 1 <= rt.stats.peak_feed_batch <= max_batch
    wide, wide_rt = _run_all(tmp_path, 64)
    assert capped == wide
    assert all(len(t) == GREEDY.max_tokens for t in capped)
    if max_batch == 2:  # six sessions at once do share batches when allowed to
        assert wide_rt.stats.peak_decode_batch > 2
