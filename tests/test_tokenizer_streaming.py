"""A document cut anywhere gives the tokens, and so the state, of the whole document.

Four families of tokenizer.json, trained here on the tests' own text (nothing is downloaded):
byte-level BPE (GPT-2's layout), BPE with a byte fallback and no pre-tokenizer (Llama-2's layout),
Unigram with Metaspace (SentencePiece's), WordPiece with the BERT normalizer and pre-tokenizer. The
incremental encoder (engine/tokenizer.py) equals `encode(whole, add_special_tokens=False)` for
random and exhaustive cuts; the held-back text rides in the state, through `Atlas.ingest` and
through a real `atlas serve` with offsets and a kill -9; generation stops at the model's EOS ids;
the stream decoder joins to `decode(ids)`.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from atlas.engine import Atlas, SamplingParams, SessionState, StateFormatError, save_checkpoint
from atlas.engine.runtime import GenerationDone, Runtime, RuntimeSettings
from atlas.engine.state import HELD_LEN, HELD_TEXT
from atlas.engine.store import StoreSettings, open_store
from atlas.engine.tokenizer import CONTEXT_BYTES, HOLD_BYTES, ByteTokenizer, HeldText, HFTokenizer
from bench.server_process import ServerProcess

from .helpers import same_session, tiny_atlas
from .server_helpers import kill_embedded_redis, parse_sse, running_server, stop_embedded_redis

FAMILIES = ("byte_bpe", "bpe_byte_fallback", "unigram", "wordpiece")

#: Text where a cut at the wrong place changes tokens: contractions ("'" then "'re"), runs of
#: spaces and newlines, digits, combining marks that compose with a letter several marks back,
#: added tokens, compatibility characters, Hangul jamo, flags, emoji sequences, scripts without spaces.
HARD = ("They're here, we'll see; it's 1234567 or 12. A  B   c\t\td \n\n  e\u0301 e\u0316\u0301 "
        "x\u0301\u0301 a\u0316\u0317\u0318\u0301 <|endoftext|> [MASK] </s>x <s> \ufb01ne \u2460 "
        "\uac00\uac01 \u1100\u1161\u11a8 \U0001f1eb\U0001f1f7\U0001f1e9\U0001f1ea "
        "\U0001f468\u200d\U0001f469\u200d\U0001f467 日本語の文章です。 Привет, мир! \r\n end")


def _train(family: str, lines: list[str]) -> Tokenizer:
    if family == "byte_bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(lines, trainers.BpeTrainer(
            vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        return tok
    if family == "bpe_byte_fallback":
        # Trained on words (Metaspace), served as Llama-2's tokenizer.json is: no pre-tokenizer,
        # "▁" prepended and for spaces, unknown characters as bytes.
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.train_from_iterator(lines, trainers.BpeTrainer(
            vocab_size=300, limit_alphabet=80, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
        spec = json.loads(tok.to_str())  # the 256 byte tokens, as plain (not special) vocabulary
        vocab = spec["model"]["vocab"]
        vocab.update({f"<0x{i:02X}>": len(vocab) + i for i in range(256)})
        spec["model"]["byte_fallback"] = True
        tok = Tokenizer.from_str(json.dumps(spec))
        tok.pre_tokenizer = None
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        tok.add_tokens([AddedToken("[MASK]", lstrip=True, rstrip=True)])
        return tok
    if family == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        tok.train_from_iterator(lines, trainers.UnigramTrainer(
            vocab_size=800, special_tokens=["<unk>", "</s>"], unk_token="<unk>", show_progress=False))
        return tok
    assert family == "wordpiece"
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(lines, trainers.WordPieceTrainer(
        vocab_size=600, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"], show_progress=False))
    return tok


@pytest.fixture(scope="session")
def corpus(utf8_text: bytes) -> bytes:
    return utf8_text + b"\n" + HARD.encode()


@pytest.fixture(scope="session")
def tokenizer_files(tmp_path_factory: pytest.TempPathFactory, corpus: bytes) -> dict[str, Path]:
    lines = corpus.decode().splitlines() * 3 + [HARD] * 20  # the merges of the hard cases are learnt
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family) / "tokenizer.json"
        _train(family, lines).save(str(path))
        out[family] = path
    return out


@pytest.fixture(scope="session")
def toks(tokenizer_files: dict[str, Path]) -> dict[str, HFTokenizer]:
    return {f: HFTokenizer(p) for f, p in tokenizer_files.items()}


def stream(tok, pieces: list[bytes], restore: list[bool] | None = None) -> tuple[list[int], int]:
    """The ids of the pieces pushed one by one (the encoder rebuilt from its held text where
    `restore` says, as a state saved between requests does), and the forced cuts."""
    enc = tok.incremental_encoder()
    ids: list[int] = []
    sent = b""
    forced = 0
    for i, piece in enumerate(pieces):
        ids += enc.push(piece)
        sent += piece
        held = enc.held
        assert len(held.text) <= HOLD_BYTES and len(held.context) <= CONTEXT_BYTES
        assert sent.endswith(held.text)  # bytes_committed = fed + held is exact
        if restore and restore[i]:
            forced += enc.forced_cuts
            enc = tok.incremental_encoder(HeldText(held.context, held.text))
    return ids + enc.finish(), forced + enc.forced_cuts


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = [0, *sorted(p for p in points if 0 < p < len(data)), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


# -- (a) the incremental encoder ---------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_cuts_give_the_whole_documents_ids(family, toks, corpus, data):
    tok = toks[family]
    start = data.draw(st.integers(0, len(corpus) - 1), label="start")
    doc = corpus[start:start + data.draw(st.integers(1, 1500), label="length")]
    points = data.draw(st.lists(st.integers(1, max(1, len(doc) - 1)), max_size=40), label="cuts")
    pieces = cut(doc, points)
    restore = data.draw(st.lists(st.booleans(), min_size=len(pieces), max_size=len(pieces)), label="restore")
    ids, forced = stream(tok, pieces, restore)
    assert ids == tok.encode(doc.decode("utf-8", errors="replace"))
    assert forced == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_every_cut_of_the_hard_text(family, toks):
    """Every byte position as the first cut, then the next bytes one or a few at a time: each rule of
    the hold-back (the second-to-last pre-token, clean boundaries, added tokens) is needed here."""
    tok = toks[family]
    doc = HARD.encode()
    ref = tok.encode(HARD)
    for i in range(1, len(doc)):
        for step in (1, 3):
            pieces = [doc[:i]] + [doc[j:j + step] for j in range(i, min(len(doc), i + 12), step)]
            pieces.append(doc[min(len(doc), i + 12):])
            assert stream(tok, pieces)[0] == ref, (family, i, step, doc[max(0, i - 8):i + 8])


@pytest.mark.parametrize("family", FAMILIES)
def test_invalid_utf8_is_replaced_and_counted_exactly(family, toks):
    doc = b"ab\xe2\x82cd \xff\xfe ok \xf0\x9f\x98 end \xc3"
    ref = toks[family].encode(doc.decode("utf-8", errors="replace"))
    rng = random.Random(1)
    for _ in range(50):
        ids, _ = stream(toks[family], cut(doc, [rng.randrange(1, len(doc)) for _ in range(6)]),
                        [rng.random() < 0.5 for _ in range(7)])
        assert ids == ref


@pytest.mark.parametrize("family", FAMILIES)
def test_the_hold_back_is_bounded(family, toks):
    """A pre-token longer than the bound is cut (the one place invariance is given up): the held
    text never exceeds HOLD_BYTES (`stream` checks), and ordinary text never hits the bound (the
    random-cut test checks). Families that cut inside words where no token spans the cut (no
    pre-tokenizer, Metaspace) may not need to."""
    tok = toks[family]
    doc = ("start " + "ab" * 3000 + " then " + "日本" * 900 + " end").encode()
    ids, forced = stream(tok, [doc[i:i + 100] for i in range(0, len(doc), 100)])
    assert forced > 0 or ids == tok.encode(doc.decode())
    if family in ("byte_bpe", "wordpiece"):  # a 6000-byte pre-token
        assert forced > 0
    if family == "byte_bpe":  # lossless: the cut changes tokens, never text
        assert tok.decode(ids) == doc.decode()
    # where the bound cuts depends on the document alone, not on how the upload was cut
    rng = random.Random(family)
    for text in (doc, b"start " + b"a" * 5000 + b" end"):
        ids = stream(tok, [text])[0]
        for size in (13, 100, 700, 1500, 5010):
            assert stream(tok, [text[i:i + size] for i in range(0, len(text), size)])[0] == ids, size
        for _ in range(3):
            pieces = cut(text, [rng.randrange(1, len(text)) for _ in range(30)])
            assert stream(tok, pieces, [rng.random() < 0.5 for _ in pieces])[0] == ids


def test_byte_tokenizer_holds_nothing_back():
    tok = ByteTokenizer()
    enc = tok.incremental_encoder()
    assert enc.push("é🐈".encode()[:3]) == list("é🐈".encode()[:3]) and enc.held == HeldText()
    assert enc.finish() == []
    bundled = Atlas.load(device="cpu")
    state = bundled.new_state()
    assert not state.holds_text and HELD_LEN not in state.tensors
    assert len(bundled.save_state(state)) == 147_440  # the size README.md and docs/model.md cite


# -- states: Atlas.ingest, save and load --------------------------------------------------------------

def hf_atlas(tok: HFTokenizer, eos: tuple[int, ...] = ()) -> Atlas:
    base = tiny_atlas(torch.float32, vocab_size=tok.vocab_size, d_model=16, chunk_size=32, swa_window=32)
    return Atlas(base.model, tok, eos_token_ids=eos)


@pytest.mark.parametrize("family", FAMILIES)
def test_atlas_ingest_gives_one_state_for_any_cut(family, toks, corpus):
    tok = toks[family]
    atlas = hf_atlas(tok)
    doc = corpus[:1200] + HARD.encode()  # 1200 may cut a character: it is U+FFFD for both
    text = doc.decode("utf-8", errors="replace")
    one = atlas.ingest(atlas.new_state(), doc)
    rng = random.Random(family)
    for _ in range(2):
        state = atlas.new_state()
        for piece in cut(doc, [rng.randrange(1, len(doc)) for _ in range(20)]):
            state = atlas.ingest(state, piece)
            if rng.random() < 0.3:  # through bytes, as the store keeps it
                state = atlas.load_state(atlas.save_state(state))
        assert atlas.save_state(state) == atlas.save_state(one)
    held = one.held()
    assert held.text and doc.endswith(held.text) and one.tokens[0] < len(tok.encode(text))
    assert one.tensors[HELD_TEXT].shape == (1, CONTEXT_BYTES + HOLD_BYTES)
    # generate ends the document where the prompt starts: as if the whole document was fed
    whole, _ = atlas.feed(atlas.new_state(), tok.encode(text))
    params = SamplingParams(max_tokens=6, temperature=0)
    answer = [t.id for t in atlas.generate(one, "Q?", params)]
    assert answer == [t.id for t in atlas.generate(whole, "Q?", params)]
    ended, ids = atlas.end_document(one)
    assert same_session(atlas.feed(ended, ids)[0], whole) and one.held() == held  # `one` is untouched


def test_load_state_requires_the_held_text_tensors_of_its_tokenizer(toks):
    hf = hf_atlas(toks["byte_bpe"])
    plain = Atlas(hf.model, ByteTokenizer())
    hf_state, plain_state = hf.save_state(hf.new_state()), plain.save_state(plain.new_state())
    assert len(hf_state) > len(plain_state)
    hf.load_state(hf_state)
    plain.load_state(plain_state)
    with pytest.raises(StateFormatError):
        hf.load_state(plain_state)
    with pytest.raises(StateFormatError):
        plain.load_state(hf_state)
    # a held length past the bound is a corrupt state, not an out-of-bounds read
    bad = hf.new_state()
    bad = SessionState(dict(bad.tensors, **{HELD_LEN: torch.tensor([[0, HOLD_BYTES + 1]])}), bad.fingerprint)
    with pytest.raises(StateFormatError):
        hf.load_state(hf.save_state(bad))


def test_runtime_checkpoints_and_a_cancel_save_exact_byte_counts(toks, corpus, tmp_path):
    """The runtime saves an ingest at marks only: after checkpoints and a client gone mid-upload,
    the stored state is the one of exactly `bytes_committed` bytes (the held text in it), and a
    resume from there ends in the one-request state."""
    atlas = hf_atlas(toks["byte_bpe"])
    store = open_store(StoreSettings(redis_url=None, data_dir=tmp_path))
    runtime = Runtime(atlas, store, RuntimeSettings(checkpoint_tokens=40, ingest_chunks_per_step=1))
    doc = corpus[:2500]

    async def body(data: bytes, size: int, delay: float = 0.0):
        for i in range(0, len(data), size):
            await asyncio.sleep(delay)
            yield data[i:i + size]

    async def run() -> tuple[str, list[tuple[int, int]]]:
        sid = (await runtime.create_session("t")).id
        seen: list[tuple[int, int]] = []
        agen = runtime.ingest(sid, "t", body(doc, 37, delay=0.01), offset=0)
        async for _ in agen:
            meta = await asyncio.to_thread(store.meta, sid)
            seen.append((meta.bytes_committed, meta.tokens))
            if meta.bytes_committed >= len(doc) // 2:
                break
        await agen.aclose()  # the client goes away: the job is cancelled between two marks
        while runtime.stats.admitted:
            await asyncio.sleep(0.02)
        return sid, seen

    try:
        sid, seen = asyncio.run(run())
        data, meta = store.get(sid)
        assert len({b for b, _ in seen}) > 2  # checkpoints went on during the upload
        assert len(doc) // 2 <= meta.bytes_committed < len(doc)
        state = atlas.load_state(data)
        assert state.tokens[0] == meta.tokens and doc[:meta.bytes_committed].endswith(state.held().text)
        for nbytes, tokens in seen:  # every count a checkpoint stored maps to its tokens
            assert atlas.ingest(atlas.new_state(), doc[:nbytes]).tokens[0] == tokens
        one = atlas.ingest(atlas.new_state(), doc)
        assert atlas.save_state(atlas.ingest(state, doc[meta.bytes_committed:])) == atlas.save_state(one)

        async def resume() -> None:
            async for _ in runtime.ingest(sid, "t", body(doc[meta.bytes_committed - 5:], 64),
                                          offset=meta.bytes_committed - 5):
                pass

        asyncio.run(resume())
        data, meta = store.get(sid)
        assert meta.bytes_committed == len(doc) and data == atlas.save_state(one)
    finally:
        runtime.close()
        store.close()


# -- (c) generation stops at EOS ----------------------------------------------------------------------

SAMPLED = SamplingParams(max_tokens=24, temperature=1.0, seed=5)


def eos_case(tok: HFTokenizer) -> tuple[Atlas, list[int], int]:
    """A model, its (seeded) answer without EOS, and an index i whose token first appears there:
    with that token as EOS the answer is its first i + 1 tokens."""
    atlas = hf_atlas(tok)
    state = atlas.ingest(atlas.new_state(), "English: The server reads a document once.")
    free = [t.id for t in atlas.generate(state, "Q?", SAMPLED)]
    i = next(i for i in range(3, len(free)) if free[i] not in free[:i])
    return hf_atlas(tok, eos=(free[i],)), free, i


def test_eos_stops_a_generation(toks):
    tok = toks["byte_bpe"]
    atlas, free, i = eos_case(tok)
    state = atlas.ingest(atlas.new_state(), "English: The server reads a document once.")
    gen = atlas.generate(state, "Q?", SAMPLED)
    pieces = [t.text for t in gen]
    assert gen.token_ids == free[:i + 1] and gen.finish_reason == "stop"
    assert gen.text == "".join(pieces) == tok.decode(free[:i])  # the EOS token shows nothing


def test_eos_stops_a_generation_in_the_worker(toks, tmp_path):
    tok = toks["byte_bpe"]
    atlas, free, i = eos_case(tok)
    store = open_store(StoreSettings(redis_url=None, data_dir=tmp_path))
    runtime = Runtime(atlas, store, RuntimeSettings())

    async def body():
        yield b"English: The server reads a document once."

    async def run():
        sid = (await runtime.create_session("t")).id
        async for _ in runtime.ingest(sid, "t", body()):
            pass

        async def one(max_tokens: int):
            out, done = [], None
            params = SAMPLED.model_copy(update={"max_tokens": max_tokens})
            async for ev in runtime.generate(sid, "t", "Q?", params):
                if isinstance(ev, GenerationDone):
                    done = ev
                else:
                    out.append(ev)
            return out, done

        return await asyncio.gather(one(24), one(2))  # in one decode batch: one ends at EOS

    try:
        (out, done), (short, short_done) = asyncio.run(run())
    finally:
        runtime.close()
        store.close()
    assert [t.id for t in out] == free[:i + 1] and done.finish_reason == "stop"
    assert done.completion_tokens == i + 1
    assert "".join(t.text for t in out) == tok.decode(free[:i])  # the EOS token shows nothing
    assert [t.id for t in short] == free[:2] and short_done.finish_reason == "length"


# -- (d) the stream decoder ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_stream_decoder_joins_to_decode_with_bounded_work(family, toks, corpus):
    tok = toks[family]
    calls: list[int] = []
    real = tok._tok

    class Counting:  # what the decoder decodes at each step
        def decode(self, ids, *args, **kw):
            calls.append(len(ids))
            return real.decode(ids, *args, **kw)

    text = corpus.decode()
    ids = tok.encode(text)
    dec = tok.stream_decoder()
    dec._tok = Counting()
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids)
    if "\ufffd" not in text:  # (the shared UTF-8 demo text has some of its own)
        assert not any("\ufffd" in p for p in pieces)  # no half character ever shows
    assert max(calls) <= 2 * (dec.MAX_WAIT + 2)  # bounded: linear in the answer, not quadratic
    # ids a model may sample in any order (bytes that never make a character): no error, and what
    # is shown is decode's text. (Not with a byte fallback: `decode` shows a run of byte tokens
    # with an invalid sequence in it as U+FFFD throughout, valid bytes too, however long the run.)
    rng = random.Random(0)
    noise = [rng.randrange(tok.vocab_size) for _ in range(400)]
    dec = tok.stream_decoder()
    shown = "".join([dec.push(i) for i in noise] + [dec.flush()])
    assert family == "bpe_byte_fallback" or shown == tok.decode(noise)


# -- (b) through a real server ------------------------------------------------------------------------

def write_model(folder: Path, tokenizer_file: Path) -> Path:
    tok = HFTokenizer(tokenizer_file)
    model = tiny_atlas(torch.float32, vocab_size=tok.vocab_size, d_model=16, chunk_size=16,
                       swa_window=16).model
    save_checkpoint(model, folder)
    shutil.copy(tokenizer_file, folder / "tokenizer.json")
    return folder


def ingest(c: httpx.Client, sid: str, data: bytes, offset: int | None = None, piece: int = 4096,
           delay: float = 0.0) -> dict:
    def body():
        for i in range(0, len(data), piece):
            if delay:
                time.sleep(delay)
            yield data[i:i + piece]

    r = c.post(f"/v1/sessions/{sid}/ingest", params={} if offset is None else {"offset": offset},
               content=body(), headers={"Content-Type": "text/plain"})
    assert r.status_code == 200, r.text
    last = parse_sse(r.text)[-1]
    assert last.get("done") is True, last
    return last


def continuation(c: httpx.Client, sid: str) -> list[int]:
    r = c.post(f"/v1/sessions/{sid}/generate", json={"prompt": "\nQ:", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return [e["token"] for e in parse_sse(r.text)[:-1]]


def stored(data_dir: Path, sid: str) -> bytes:
    store = open_store(StoreSettings(redis_url=None, data_dir=data_dir))
    try:
        return store.get(sid)[0]
    finally:
        store.close()


@pytest.mark.parametrize(
    "family", [FAMILIES[0], *(pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES[1:])])
def test_server_one_request_many_cuts_and_kill_9_give_one_state(tmp_path, tokenizer_files, corpus, family):
    """One ingest request; the same document in many requests cut at random bytes (inside
    characters and words, some overlapping) with ?offset=; and an upload whose server is killed
    (kill -9, with its embedded Redis) while checkpoints go on, resumed from `bytes_committed` after
    a restart: the same tokens, the same state bytes, the same greedy continuation."""
    folder = write_model(tmp_path / f"tiny-{family}", tokenizer_files[family])
    doc = corpus[:3000].decode("utf-8", errors="ignore").encode() + HARD.encode()
    env = {"ATLAS_MODEL": str(folder), "ATLAS_CHECKPOINT_TOKENS": "48", "ATLAS_LEASE_TTL_MS": "1500",
           "ATLAS_INGEST_CHUNKS_PER_STEP": "1"}
    rng = random.Random(7)
    with running_server(tmp_path / "a", env) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        one, many = (c.post("/v1/sessions").json()["id"] for _ in range(2))
        done_one = ingest(c, one, doc)
        points = sorted(rng.sample(range(1, len(doc)), 14))
        starts = [0, *points]
        for k, (a, b) in enumerate(zip(starts, [*points, len(doc)], strict=True)):
            a = max(0, a - rng.choice([0, 0, 3])) if k else a  # sometimes resend a few bytes
            last = ingest(c, many, doc[a:b], offset=a, piece=rng.choice([1, 5, 64]))
            assert last["bytes_committed"] == b
        meta_one, meta_many = (c.get(f"/v1/sessions/{s}").json() for s in (one, many))
        assert done_one["bytes_committed"] == meta_many["bytes_committed"] == len(doc)
        assert meta_one["tokens"] == meta_many["tokens"] == done_one["tokens"]
        expected = continuation(c, one)
        assert continuation(c, many) == expected
        assert c.get(f"/v1/sessions/{one}").json() == meta_one  # a generation leaves the session alone
        reference = stored(tmp_path / "a" / "data", one)
        assert stored(tmp_path / "a" / "data", many) == reference

    work = tmp_path / "b"
    srv = ServerProcess(work, env).start()
    try:
        c = httpx.Client(base_url=srv.url, timeout=120)
        sid = c.post("/v1/sessions").json()["id"]

        def upload() -> None:
            try:
                ingest(c, sid, doc, offset=0, piece=32, delay=0.02)
            except (httpx.HTTPError, AssertionError):
                pass  # the server died under it

        uploader = threading.Thread(target=upload)
        uploader.start()
        deadline = time.monotonic() + 60
        while httpx.get(f"{srv.url}/v1/sessions/{sid}").json()["bytes_committed"] < len(doc) // 3:
            assert time.monotonic() < deadline, srv.log(2000)
            time.sleep(0.01)
        srv.kill()
        assert kill_embedded_redis(work / "data") is not None
        uploader.join()

        srv.start()
        c = httpx.Client(base_url=srv.url, timeout=120)
        meta = c.get(f"/v1/sessions/{sid}").json()
        resume = meta["bytes_committed"]
        assert len(doc) // 3 <= resume < len(doc) and 0 < meta["tokens"]
        deadline = time.monotonic() + 10
        while True:  # the dead writer's lease may still be running out
            r = c.post(f"/v1/sessions/{sid}/ingest", params={"offset": resume}, content=doc[resume:])
            if r.status_code != 409:
                break
            assert r.json()["error"]["code"] == "lease_conflict" and time.monotonic() < deadline
            time.sleep(0.2)
        assert r.status_code == 200 and parse_sse(r.text)[-1]["bytes_committed"] == len(doc)
        meta = c.get(f"/v1/sessions/{sid}").json()
        assert meta["tokens"] == meta_one["tokens"]
        assert continuation(c, sid) == expected
        assert stored(work / "data", sid) == reference
    finally:
        srv.kill()
        stop_embedded_redis(work / "data")


def test_server_stops_at_the_eos_of_generation_config(tmp_path, tokenizer_files, corpus):
    """`generation_config.json`'s `eos_token_id` reaches a served model: an answer ends at it with
    finish_reason "stop", the token counted and its text not shown."""
    folder = write_model(tmp_path / "tiny-bpe", tokenizer_files["byte_bpe"])
    doc = corpus[:600].decode("utf-8", errors="ignore").encode()
    local = Atlas.load(folder, device="cpu")
    state = local.ingest(local.new_state(), doc)
    free = [t.id for t in local.generate(state, "\nQ:", SAMPLED)]  # seeded: the server's answer too
    i = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [free[i]]}))
    with running_server(tmp_path / "a", {"ATLAS_MODEL": str(folder)}) as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as c:
        sid = c.post("/v1/sessions").json()["id"]
        ingest(c, sid, doc)
        r = c.post(f"/v1/sessions/{sid}/generate", json={"prompt": "\nQ:", "max_tokens": SAMPLED.max_tokens,
                                                         "temperature": SAMPLED.temperature,
                                                         "seed": SAMPLED.seed})
        events = parse_sse(r.text)
        tokens, done = events[:-1], events[-1]
        assert [e["token"] for e in tokens] == free[:i + 1]
        assert done["finish_reason"] == "stop" and tokens[-1]["text"] == ""
        assert "".join(e["text"] for e in tokens) == local.decode(free[:i])
