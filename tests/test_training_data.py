"""The streaming text loader of `atlas train` (training/data.py): packing, the split over micro-batch
slots, the saved position; and `atlas tokenizer train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from atlas.engine.checkpoint import read_checkpoint
from atlas.engine.tokenizer import ByteTokenizer, HFTokenizer
from atlas.server.cli import app
from atlas.training.data import CorpusConfig, CorpusLoader, TokenStream, expand_files, open_corpus

from .helpers import TEST_DATA, shared_text

pytest.importorskip("datasets")

SAMPLE = TEST_DATA / "utf8-sample.txt"


def loader(files: list[Path], slots: list[int], n_slots: int, seq_len: int = 16, rows: int = 2,
           eos: int | None = None, **kw) -> CorpusLoader:
    cfg = CorpusConfig(files=[str(f) for f in files], seq_len=seq_len, batch_rows=rows * n_slots, **kw)
    return CorpusLoader(cfg, ByteTokenizer(), eos, slots, n_slots)


def joined(batches: list[torch.Tensor]) -> list[int]:
    """The token stream the rows were cut from (each row starts with the last token of the one before)."""
    rows = [row for batch in batches for row in batch]
    out = rows[0].tolist()
    for row in rows[1:]:
        assert row[0].item() == out[-1]  # the overlap: every token is predicted once
        out += row[1:].tolist()
    return out


def test_rows_pack_the_text_in_order_and_overlap_by_one_token():
    ld = loader([SAMPLE], [0], 1, seq_len=16, rows=3)
    batches = [ld.next_micro_batches()[0] for _ in range(5)]
    assert all(b.shape == (3, 17) and b.dtype == torch.long for b in batches)
    text = SAMPLE.read_bytes()
    stream = joined(batches)
    assert bytes(stream) == text[:len(stream)] and len(stream) == 5 * 3 * 16 + 1


def test_slots_split_files_or_records_and_together_read_everything(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("".join(f"a{i:03d}\n" for i in range(40)))
    b.write_text("".join(f"b{i:03d}\n" for i in range(40)))
    # Two files, two slots: a file each.
    rows = [loader([a, b], [k], 2, seq_len=10, rows=1).next_micro_batches()[0] for k in range(2)]
    assert bytes(rows[0][0].tolist()).startswith(b"a000\na001")
    assert bytes(rows[1][0].tolist()).startswith(b"b000")
    # One file, two slots: alternate lines (datasets' split_dataset_by_node), together all of them.
    # 20 lines of 5 bytes a slot: 11 rows of 9 predicted tokens and the first.
    got = [bytes(joined([loader([a], [k], 2, seq_len=9, rows=11).next_micro_batches()[0]])) for k in range(2)]
    assert got[0].startswith(b"a000\na002\na004\n") and got[1].startswith(b"a001\na003\n")
    lines = sorted(x for g in got for x in g.decode().split("\n")[:-1])
    assert lines == [f"a{i:03d}" for i in range(40)]
    # A process running both slots gets the same rows as two processes running one each.
    both = loader([a], [0, 1], 2, seq_len=9, rows=11).next_micro_batches()
    assert [bytes(joined([r])) for r in both] == got


def test_jsonl_and_parquet_documents_end_with_the_separator(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"body": f"doc {i}", "id": i}) + "\n" for i in range(3)))
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["row one", "row two"], "n": [1, 2]}), table)
    ld = loader([docs, table], [0], 1, seq_len=8, rows=5, eos=0, text_field="body")
    stream = bytes(joined([ld.next_micro_batches()[0]]))
    assert stream.startswith(b"doc 0\0doc 1\0doc 2\0row one\0row two\0")
    found = expand_files([str(tmp_path / "*.jsonl"), str(table)])
    assert [f.name for f in found] == ["docs.jsonl", "t.parquet"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        expand_files([str(tmp_path / "missing-*.txt")])
    with pytest.raises(ValueError, match="corpus files are"):
        CorpusConfig(files=["x.docx"])


def test_a_saved_position_resumes_at_the_same_token_also_across_epochs(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("".join(f"line {i}\n" for i in range(30)))  # 240 bytes: epochs turn over often
    first = loader([short, SAMPLE], [0, 1], 2, seq_len=20, rows=3)
    for _ in range(7):
        first.next_micro_batches()
    state = json.loads(json.dumps(_plain(first.state_dict())))  # what a checkpoint keeps survives JSON
    ahead = [first.next_micro_batches() for _ in range(12)]
    assert first.streams[0].epoch >= 2  # slot 0 reads short.txt, again and again
    again = loader([short, SAMPLE], [0, 1], 2, seq_len=20, rows=3)
    again.load_state_dict(_tensors(state), 2)
    for want in ahead:
        assert all(torch.equal(x, y) for x, y in zip(want, again.next_micro_batches(), strict=True))
    with pytest.raises(ValueError, match="micro_batches"):
        again.load_state_dict(_tensors(state), 4)


def test_a_slot_without_text_is_an_error(tmp_path):
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "only one record"}) + "\n")
    with pytest.raises(ValueError, match="gets no text"):
        loader([one], [1], 2).next_micro_batches()


def test_a_stream_reads_its_examples_lazily():
    stream = TokenStream(lambda: open_corpus([SAMPLE]), 0, 1, ByteTokenizer().encode, None, 9)
    stream.rows(1)
    assert len(stream.state_dict()["buffer"]) < 200  # a few lines read, not the file


def _plain(state):
    return {k: {**v, "buffer": v["buffer"].tolist()} for k, v in state.items()}


def _tensors(state):
    return {k: {**v, "buffer": torch.tensor(v["buffer"], dtype=torch.long)} for k, v in state.items()}


# -- atlas tokenizer train ---------------------------------------------------------------------------

def test_tokenizer_train_writes_a_tokenizer_init_and_the_server_read(tmp_path):
    text = shared_text("tinyshakespeare.txt") or SAMPLE
    out = tmp_path / "tok" / "tokenizer.json"
    runner = CliRunner()
    res = runner.invoke(app, ["tokenizer", "train", str(text), str(SAMPLE), "--vocab", "400",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    tok = HFTokenizer(out)
    assert 300 < tok.vocab_size <= 400
    sample = "First Citizen:\nBefore we proceed any further, hear me speak. Καλημέρα κόσμε 🙂\n"
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample and len(ids) < len(sample.encode())
    # The server's incremental encoder cuts the same tokens from the text in pieces.
    enc, pieces = tok.incremental_encoder(), []
    data = sample.encode()
    for i in range(0, len(data), 5):
        pieces += enc.push(data[i:i + 5])
    assert pieces + enc.finish() == ids
    assert json.loads(out.with_name("tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    # atlas init takes it: its vocabulary, and the end-of-sequence id from tokenizer_config.json.
    config = tmp_path / "model.json"
    config.write_text(json.dumps({"model_type": "atlas", "format_version": 1, "d_model": 16, "n_heads": 2,
                                  "n_layers": 1, "chunk_size": 16, "swa_window": 32}))
    res = runner.invoke(app, ["init", "--config", str(config), "--tokenizer", str(out),
                              "--out", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    ckpt = read_checkpoint(tmp_path / "m")
    assert ckpt.config.vocab_size == tok.vocab_size
    assert list(ckpt.eos_token_ids) == [tok.encode("<|endoftext|>")[0]] == [0]


def test_tokenizer_train_refuses_what_it_cannot_do(tmp_path):
    out = str(tmp_path / "t.json")
    run = lambda *args: CliRunner().invoke(app, ["tokenizer", "train", *args, "--out", out])
    res = run(str(SAMPLE), "--vocab", "100")
    assert res.exit_code == 2 and "at least 257" in res.output
    res = run(str(tmp_path / "none.txt"))
    assert res.exit_code == 2 and "no such file" in res.output
