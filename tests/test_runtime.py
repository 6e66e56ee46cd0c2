"""The runtime against the plain model API: batching and interleaving change nothing."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
import torch

from atlas.engine import SamplingParams
from atlas.engine.runtime import (
    GenerationDone,
    OffsetGapError,
    QueueFullError,
    Runtime,
    RuntimeSettings,
)
from atlas.engine.store import LeaseConflictError, SessionNotFoundError

from .helpers import same_session

GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture
def runtime(atlas, store):
    rt = Runtime(atlas, store, RuntimeSettings(ingest_chunks_per_step=2, checkpoint_tokens=100))
    yield rt
    rt.close()


async def pieces(data: bytes, size: int, delay: float = 0.0):
    for i in range(0, len(data), size):
        if delay:
            await asyncio.sleep(delay)
        yield data[i:i + size]


def docs(n: int) -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    return [bytes(torch.randint(32, 127, (int(torch.randint(200, 700, (1,), generator=g)),),
                                generator=g).tolist()) for _ in range(n)]


async def ingest_all(rt, sid, data, size=97, offset=None, tenant="t"):
    last = None
    async for p in rt.ingest(sid, tenant, pieces(data, size), offset=offset):
        last = p
    return last


async def answer(rt, sid, prompt, params=GREEDY, commit=False, tenant="t"):
    toks, done = [], None
    async for ev in rt.generate(sid, tenant, prompt, params, commit=commit):
        if isinstance(ev, GenerationDone):
            done = ev
        else:
            toks.append(ev.id)
    return toks, done


def reference(atlas, data: bytes, prompt: str):
    state, _ = atlas.feed(atlas.new_state(), list(data))
    gen = atlas.generate(state, prompt, GREEDY)
    return state, [t.id for t in gen]


def test_runtime_invariance_many_sessions_interleaved(atlas, runtime, store):
    """Six sessions ingesting and answering at once equal each session run alone."""
    texts = docs(6)

    async def one(i: int):
        meta = await runtime.create_session("t")
        half = len(texts[i]) // 2
        await ingest_all(runtime, meta.id, texts[i][:half], size=31 + i)
        await ingest_all(runtime, meta.id, texts[i][half:], size=50 + 7 * i)
        toks, done = await answer(runtime, meta.id, "Q?")
        return meta.id, toks, done

    async def main():
        return await asyncio.gather(*(one(i) for i in range(6)))

    results = asyncio.run(main())
    for i, (sid, toks, done) in enumerate(results):
        ref_state, ref_toks = reference(atlas, texts[i], "Q?")
        assert toks == ref_toks
        assert done.finish_reason == "length" and done.completion_tokens == GREEDY.max_tokens
        data, meta = store.get(sid)
        assert meta.bytes_committed == len(texts[i]) and meta.tokens == len(texts[i])
        assert same_session(atlas.load_state(data), ref_state)


def test_runtime_offsets_overlap_is_idempotent_and_gap_refused(atlas, runtime, store):
    text = docs(1)[0] * 3
    assert len(text) > 300

    async def main():
        sid = (await runtime.create_session("t")).id
        await ingest_all(runtime, sid, text[:300])
        await ingest_all(runtime, sid, text[250:], offset=250)  # 50 bytes sent again
        with pytest.raises(OffsetGapError):
            await ingest_all(runtime, sid, b"xyz", offset=len(text) + 5)
        return sid

    sid = asyncio.run(main())
    data, meta = store.get(sid)
    assert meta.bytes_committed == len(text)
    assert same_session(atlas.load_state(data), atlas.feed(atlas.new_state(), list(text))[0])


def inside_a_character(text: bytes, near: int) -> int:
    """The first offset from ``near`` on that falls inside a multi-byte UTF-8 character."""
    return next(i for i in range(near, len(text)) if text[i] & 0xC0 == 0x80)


def test_runtime_utf8_split_across_requests(atlas, runtime, store, utf8_text):
    cuts = [0, inside_a_character(utf8_text, 1000), inside_a_character(utf8_text, 2000),
            inside_a_character(utf8_text, 3000)]
    text = utf8_text[:cuts[-1]]  # the last request ends inside a character too

    async def main():
        sid = (await runtime.create_session("t")).id
        for a, b in itertools.pairwise(cuts):
            await ingest_all(runtime, sid, text[a:b], offset=a)
        return sid

    sid = asyncio.run(main())
    data, meta = store.get(sid)
    assert meta.bytes_committed == len(text)
    assert same_session(atlas.load_state(data), atlas.feed(atlas.new_state(), list(text))[0])


def test_runtime_cancel_mid_ingest_keeps_exactly_the_committed_bytes(atlas, runtime, store):
    text = docs(1)[0] * 4

    async def main():
        sid = (await runtime.create_session("t")).id
        seen = 0
        agen = runtime.ingest(sid, "t", pieces(text, 40, delay=0.01))
        async for p in agen:
            seen = p.bytes_committed
            if seen >= 200:
                break
        await agen.aclose()  # the client goes away
        deadline = asyncio.get_running_loop().time() + 30
        # The runtime commits what it read, then lets go of the session.
        while runtime.stats.admitted and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        assert not runtime.stats.admitted
        return sid

    sid = asyncio.run(main())
    data, meta = store.get(sid)
    assert 0 < meta.bytes_committed < len(text)
    expected, _ = atlas.feed(atlas.new_state(), list(text[:meta.bytes_committed]))
    assert same_session(atlas.load_state(data), expected)


def test_runtime_counts_each_committed_document_token_once(atlas, runtime, store):
    """`document_tokens` (the server's atlas:ingest_tokens_total): two ingests into one session at
    once, and one whose client leaves, count exactly the tokens the session holds."""
    before = runtime.stats.document_tokens

    async def main():
        sid = (await runtime.create_session("t")).id

        async def slow():
            async for _ in runtime.ingest(sid, "t", pieces(b"x" * 600, 50, delay=0.01)):
                pass

        async def append():
            await asyncio.sleep(0.02)  # starts while the slow one holds the session
            async for _ in runtime.ingest(sid, "t", pieces(b"y" * 10, 10)):
                pass

        await asyncio.gather(slow(), append())
        left = runtime.ingest(sid, "t", pieces(b"z" * 2000, 40, delay=0.01))
        for _ in range(5):
            await left.__anext__()
        await left.aclose()
        for _ in range(400):  # the runtime commits what it read in the background
            if runtime.stats.document_tokens - before == store.meta(sid).tokens > 610:
                break
            await asyncio.sleep(0.025)
        return sid

    sid = asyncio.run(main())
    assert runtime.stats.document_tokens - before == store.meta(sid).tokens > 610


def test_runtime_fork_and_generate_leave_parent_alone_commit_appends(atlas, runtime, store):
    text = docs(1)[0]

    async def main():
        sid = (await runtime.create_session("t")).id
        await ingest_all(runtime, sid, text)
        before = store.get(sid)[0]
        child = await runtime.fork(sid, "t")
        await ingest_all(runtime, child.id, b" more text for the child only")
        toks, _ = await answer(runtime, sid, "Q?")
        assert store.get(sid)[0] == before  # neither the fork nor a question changed it
        toks_c, done = await answer(runtime, sid, "Q?", commit=True)
        assert toks_c == toks
        assert done.session.tokens == len(text) + 2 + GREEDY.max_tokens
        assert done.session.bytes_committed == len(text)
        return sid, child.id

    sid, child = asyncio.run(main())
    assert store.meta(child).bytes_committed == len(text) + len(b" more text for the child only")
    # The committed exchange equals the plain API's generation, bit for bit in the recurrent state.
    state, _ = atlas.feed(atlas.new_state(), list(text))
    gen = atlas.generate(state, "Q?", GREEDY)
    list(gen)
    assert same_session(atlas.load_state(store.get(sid)[0]), gen.state)


def test_runtime_a_committed_generation_cut_short_keeps_every_token_sent(atlas, runtime, store):
    """A client that leaves a `commit` generation (or its timeout) commits the exchange up to where
    it stopped: the prompt and every token sampled, as a generation that ends "length" does."""
    text = docs(1)[0]
    params = SamplingParams(max_tokens=10_000, temperature=0)

    async def main():
        sid = (await runtime.create_session("t")).id
        await ingest_all(runtime, sid, text)
        gen = runtime.generate(sid, "t", "Q?", params, commit=True)
        got = [(await gen.__anext__()).id for _ in range(70)]  # past a chunk boundary
        await gen.aclose()
        for _ in range(400):  # the runtime commits in the background
            if store.meta(sid).tokens > len(text):
                break
            await asyncio.sleep(0.025)
        return sid, got

    sid, got = asyncio.run(main())
    meta = store.meta(sid)
    sent = meta.tokens - len(text) - 2
    assert sent >= len(got) and meta.bytes_committed == len(text)
    state, _ = atlas.feed(atlas.new_state(), list(text))
    gen = atlas.generate(state, "Q?", SamplingParams(max_tokens=sent, temperature=0))
    assert [t.id for t in gen][:len(got)] == got
    assert same_session(atlas.load_state(store.get(sid)[0]), gen.state)


def test_runtime_timeout_ends_like_length_with_the_held_back_text(atlas, runtime, store):
    """At its timeout a generation ends "timeout" after the token it is sampling: the text held back
    as the start of a stop string is sent, and a committed exchange holds that token."""
    text = docs(1)[0]
    state, _ = atlas.feed(atlas.new_state(), list(text))
    first = next(iter(atlas.generate(state, "Q?", GREEDY))).text
    params = SamplingParams(max_tokens=100, temperature=0, stop=[first + "\x01\x02"])

    async def main():
        sid = (await runtime.create_session("t")).id
        await ingest_all(runtime, sid, text)
        events = [ev async for ev in runtime.generate(sid, "t", "Q?", params, commit=True, timeout_s=0)]
        return sid, events

    sid, events = asyncio.run(main())
    *tokens, done = events
    assert done.finish_reason == "timeout" and done.completion_tokens == len(tokens) == 1
    assert tokens[0].text == first  # not held back and then lost
    assert store.meta(sid).tokens == len(text) + 2 + 1


def test_runtime_long_generations_cross_chunks_in_a_batch(atlas, runtime):
    """Eight sessions at different phases decode across several chunk boundaries together."""
    texts = docs(8)
    params = SamplingParams(max_tokens=40, temperature=0.7, seed=3)

    async def one(i: int):
        sid = (await runtime.create_session("t")).id
        await ingest_all(runtime, sid, texts[i][:100 + 7 * i])
        return await answer(runtime, sid, "go", params=params, commit=True)

    async def main():
        return await asyncio.gather(*(one(i) for i in range(8)))

    for i, (toks, done) in enumerate(asyncio.run(main())):
        state, _ = atlas.feed(atlas.new_state(), list(texts[i][:100 + 7 * i]))
        gen = atlas.generate(state, "go", params)
        assert toks == [t.id for t in gen]
        assert same_session(done.state, gen.state)


def test_runtime_tenants_and_full_queue(atlas, store):
    rt = Runtime(atlas, store, RuntimeSettings(max_requests=1))
    try:
        async def main():
            sid = (await rt.create_session("a")).id
            with pytest.raises(SessionNotFoundError):
                await rt.get_session(sid, "b")
            slow = rt.ingest(sid, "a", pieces(b"x" * 400, 10, delay=0.05))
            await slow.__anext__()  # one request admitted and running
            with pytest.raises(QueueFullError):
                await answer(rt, None, "hi", tenant="a")
            await slow.aclose()

        asyncio.run(main())
    finally:
        rt.close()


def test_runtime_sessionless_completion(atlas, runtime):
    toks, done = asyncio.run(answer(runtime, None, "hello"))
    gen = atlas.generate(atlas.new_state(), "hello", GREEDY)
    assert toks == [t.id for t in gen] and done.prompt_tokens == 5


def test_runtime_renews_its_lease_during_long_work(atlas, store):
    """An ingest that outlasts the lease TTL keeps its lease (renewed in the background): another
    writer is still refused after several lifetimes, and the ingest commits."""
    rt = Runtime(atlas, store, RuntimeSettings(lease_ttl_ms=300, checkpoint_tokens=1 << 20))
    try:
        text = docs(1)[0]

        async def main():
            sid = (await rt.create_session("t")).id
            agen = rt.ingest(sid, "t", pieces(text, 20, delay=0.1))
            await agen.__anext__()
            await asyncio.sleep(1.0)  # more than three lease lifetimes
            with pytest.raises(LeaseConflictError):
                store.lease(sid, "intruder", 300)
            async for _ in agen:
                pass
            return sid

        sid = asyncio.run(main())
        assert store.meta(sid).bytes_committed == len(text)
    finally:
        rt.close()


def test_runtime_body_error_before_a_chunk_fails_cleanly(atlas, runtime, store):
    """A body that fails before a whole chunk arrived ends the request with its error and frees
    the session (no hang, no lock left behind)."""

    async def bad_body():
        yield b"abc"
        raise ConnectionResetError("client went away")

    async def main():
        sid = (await runtime.create_session("t")).id
        with pytest.raises(ConnectionResetError):
            async for _ in runtime.ingest(sid, "t", bad_body()):
                pass
        await asyncio.wait_for(ingest_all(runtime, sid, b"hello world"), timeout=30)  # not locked
        return sid

    sid = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert store.meta(sid).bytes_committed == 3 + len(b"hello world")


def test_runtime_delete_takes_over_its_own_leftover_lease(atlas, runtime, store):
    """A lease under the runtime's own name that nothing releases (Redis went away mid-request) does
    not block a delete; another writer's lease does, saying how long it has left (Retry-After)."""
    async def main():
        mine = (await runtime.create_session("t")).id
        store.lease(mine, runtime.owner, 60_000)  # the leftover
        await runtime.delete_session(mine, "t")
        theirs = (await runtime.create_session("t")).id
        store.lease(theirs, "another-runtime", 60_000)
        with pytest.raises(LeaseConflictError) as e:
            await runtime.delete_session(theirs, "t")
        assert e.value.retry_after_ms and e.value.retry_after_ms > 50_000
        return mine, theirs

    mine, theirs = asyncio.run(main())
    assert {m.id for m in store.list("t")} >= {theirs} and mine not in {m.id for m in store.list("t")}


def test_runtime_delete_stops_the_sessions_running_ingest(atlas, runtime, store):
    """A delete does not wait for a long ingest into the session to end: the ingest stops within a
    step (committing what it read), then the session is deleted."""
    async def main():
        sid = (await runtime.create_session("t")).id
        events = []

        async def slow():  # 400 pieces, 10 ms apart: four seconds if left alone
            async for p in runtime.ingest(sid, "t", pieces(b"x" * 4000, 10, delay=0.01)):
                events.append(p)

        running = asyncio.create_task(slow())
        while not events:
            await asyncio.sleep(0.01)
        t0 = asyncio.get_running_loop().time()
        await runtime.delete_session(sid, "t")
        took = asyncio.get_running_loop().time() - t0
        await running
        return sid, took, events[-1]

    sid, took, last = asyncio.run(main())
    assert took < 2.0 and last.done and last.bytes_committed < 4000
    assert sid not in {m.id for m in store.list("t")}


def test_runtime_sweeps_the_cached_states_of_expired_sessions(atlas, runtime, store):
    """A session gone by its TTL is never deleted through the runtime: its cached state would stay
    until the cache's budget pushed it out; the sweep (every CACHE_SWEEP_S) drops it."""
    async def main():
        kept = (await runtime.create_session("t")).id
        expiring = (await runtime.create_session("t", ttl_s=1)).id
        for sid in (kept, expiring):
            await ingest_all(runtime, sid, docs(1)[0])
        return kept, expiring

    kept, expiring = asyncio.run(main())
    assert set(runtime.states.cache.sids()) >= {kept, expiring}
    deadline = time.monotonic() + 10
    while expiring in {m.id for m in store.list("t")} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert runtime.sweep_cache() == 1
    assert kept in runtime.states.cache.sids() and expiring not in runtime.states.cache.sids()
