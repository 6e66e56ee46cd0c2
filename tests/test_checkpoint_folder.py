"""The checkpoint folder (docs/formats.md, "Checkpoint folder"): the flat config.json, single-file and
sharded weights, tokenizer and generation files, the old layout and `atlas convert`, every way a
folder can be bad (one CheckpointError naming the file, also through `atlas serve`), the trainer's
output, and `atlas init` with the shipped model configs."""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from atlas.engine import Atlas, CheckpointError, ModelConfig, SamplingParams, fingerprint, save_checkpoint
from atlas.engine.api import BUNDLED_CHECKPOINT
from atlas.engine.checkpoint import (
    FORMAT_VERSION,
    count_parameters,
    load_checkpoint,
    read_checkpoint,
    read_model_config,
)
from atlas.engine.tokenizer import HFTokenizer
from atlas.server.cli import app
from atlas.training.authoring import guess_eos_token_id, init_checkpoint
from bench.server_process import ServerProcess

from .helpers import tiny_config, write_checkpoint
from .server_helpers import running_server, stop_embedded_redis

ROOT = Path(__file__).resolve().parents[1]
TEXT = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog met at noon",
        "où est le café ? ici, le café est chaud"] * 20
#: docs/formats.md, "atlas init": the shipped configs and their parameters (vocabulary 32,000).
SHIPPED = {"atlas-170m": 174_967_968, "atlas-340m": 350_858_496, "atlas-760m": 751_600_512}


def bpe_tokenizer(folder: Path, vocab: int = 300, special: tuple[str, ...] = ("<|endoftext|>",)) -> Path:
    """A byte-level BPE tokenizer trained here (no download): 256 byte tokens, `special`, merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(special),
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def word_level_tokenizer(folder: Path, special: tuple[str, ...]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXT, trainers.WordLevelTrainer(special_tokens=["[UNK]", *special],
                                                            show_progress=False))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def config_doc(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def same_tensors(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


def to_old_layout(path: Path) -> None:
    """Rewrite a folder's config.json in the layout of earlier versions: {"model": {...}, ...}."""
    doc = config_doc(path)
    fields = {k: doc.pop(k) for k in ModelConfig.model_fields}
    del doc["model_type"], doc["format_version"]
    (path / "config.json").write_text(json.dumps({"model": fields, **doc}, indent=2) + "\n")
    (path / "generation_config.json").unlink()


def run_cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.output


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


def test_single_file_round_trip(atlas: Atlas, tmp_path: Path) -> None:
    gen = {"eos_token_id": [1, 2], "temperature": 0.7, "top_k": 5, "do_sample": True,
           "transformers_version": "4.50.0"}
    save_checkpoint(atlas.model, tmp_path, extra={"training": {"steps": 3}}, generation_config=gen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json",
                                                          "model.safetensors"]
    doc = config_doc(tmp_path)
    assert list(doc)[:2] == ["model_type", "format_version"] and list(doc)[-2:] == ["training", "fingerprint"]
    assert doc["model_type"] == "atlas" and doc["format_version"] == FORMAT_VERSION == 1
    assert {k: doc[k] for k in ModelConfig.model_fields} == atlas.config.model_dump(mode="json")
    assert doc["fingerprint"] == atlas.fingerprint and doc["training"] == {"steps": 3}
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(atlas.model.state_dict())
    loaded = Atlas.load(tmp_path, device="cpu")
    assert loaded.fingerprint == atlas.fingerprint
    assert loaded.eos_token_ids == (1, 2)
    assert loaded.generation_defaults == {"temperature": 0.7, "top_k": 5}
    assert loaded.checkpoint is not None and loaded.checkpoint.generation_config == gen
    toks = list(range(40, 77))
    assert torch.equal(atlas.feed(atlas.new_state(), toks, all_logits=True)[1],
                       loaded.feed(loaded.new_state(), toks, all_logits=True)[1])
    # "do_sample": false is greedy, as in transformers.
    save_checkpoint(atlas.model, tmp_path, generation_config={"eos_token_id": 3, "do_sample": False,
                                                              "temperature": 0.9})
    assert read_checkpoint(tmp_path).generation_defaults == {"temperature": 0.0}
    assert read_checkpoint(tmp_path).eos_token_ids == (3,)


def test_sharded_round_trip_and_back_to_one_file(atlas: Atlas, tmp_path: Path) -> None:
    limit = 20_000
    save_checkpoint(atlas.model, tmp_path, max_shard_bytes=limit)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (tmp_path / "model.safetensors").exists()
    state = atlas.model.state_dict()
    assert set(index) == {"metadata", "weight_map"} and list(index["weight_map"]) == sorted(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for shard in shards:
        with safe_open(str(tmp_path / shard), "pt") as f:
            names = set(f.keys())
        assert names == {k for k, v in index["weight_map"].items() if v == shard}
        size = sum(state[k].numel() * state[k].element_size() for k in names)
        assert size <= limit or len(names) == 1
    assert fingerprint(load_checkpoint(tmp_path)) == atlas.fingerprint
    assert Atlas.load(tmp_path, device="cpu").fingerprint == atlas.fingerprint
    # Saved again in one file: the shards and the index go.
    save_checkpoint(atlas.model, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    assert Atlas.load(tmp_path, device="cpu").fingerprint == atlas.fingerprint


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_file_has_the_weights_dtype_and_their_fingerprint(atlas: Atlas, tmp_path: Path,
                                                              dtype: torch.dtype) -> None:
    save_checkpoint(atlas.model, tmp_path, dtype=dtype, max_shard_bytes=50_000)
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.dtype == dtype and set(ckpt.tensor_dtypes.values()) == {dtype}
    model = load_checkpoint(ckpt, dtype=None)  # as stored
    assert model.dtype == dtype and fingerprint(model) == ckpt.fingerprint != atlas.fingerprint
    # Loaded in float32 the weights are the rounded ones; the check ran on the bytes as stored.
    wide = load_checkpoint(tmp_path)
    for name, t in atlas.model.state_dict().items():
        assert torch.equal(wide.state_dict()[name], t.to(dtype).float()), name


def test_tokenizer_files_are_carried(atlas: Atlas, tmp_path: Path) -> None:
    src = tmp_path / "src"
    tok = word_level_tokenizer(src, special=("<|endoftext|>",))  # fits the model's 256 ids
    special = {"eos_token": "<|endoftext|>", "model_max_length": 1000000,
               "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}
    (src / "tokenizer_config.json").write_text(json.dumps(special, indent=4))
    ckpt = tmp_path / "ckpt"
    save_checkpoint(atlas.model, ckpt, tokenizer=tok, tokenizer_config=src / "tokenizer_config.json")
    assert (ckpt / "tokenizer.json").read_bytes() == tok.read_bytes()
    assert (ckpt / "tokenizer_config.json").read_bytes() == (src / "tokenizer_config.json").read_bytes()
    loaded = Atlas.load(ckpt, device="cpu")
    assert isinstance(loaded.tokenizer, HFTokenizer)
    assert loaded.checkpoint is not None and loaded.checkpoint.tokenizer_config == special
    assert loaded.decode(loaded.encode("the cat sat on the mat")) == "the cat sat on the mat"


def test_save_checkpoint_refuses_records_the_format_has_no_room_for(atlas: Atlas, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="note"):
        save_checkpoint(atlas.model, tmp_path, extra={"note": "x"})
    assert not (tmp_path / "config.json").exists()


def test_the_bundled_demo_model_is_in_the_current_format():
    doc = config_doc(BUNDLED_CHECKPOINT)
    assert doc["model_type"] == "atlas" and doc["format_version"] == 1 and "model" not in doc
    assert json.loads((BUNDLED_CHECKPOINT / "generation_config.json").read_text()) == {"eos_token_id": None}
    ckpt = read_checkpoint(BUNDLED_CHECKPOINT)
    assert not ckpt.legacy and ckpt.eos_token_ids == () and ckpt.generation_defaults == {}
    assert ckpt.fingerprint == "b24ae26f6e955128ba78acf7ba6374d865d7a77762ca30ad2be38b8d92ba8e48"


# ---------------------------------------------------------------------------------------------
# The old layout and `atlas convert`
# ---------------------------------------------------------------------------------------------


def test_old_layout_loads_with_a_warning_and_converts(atlas: Atlas, tmp_path: Path, caplog) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    save_checkpoint(atlas.model, old, extra={"training": {"steps": 7}})
    word_level_tokenizer(old, special=("<|endoftext|>",))
    to_old_layout(old)
    assert "model" in config_doc(old)
    with caplog.at_level(logging.WARNING, logger="atlas.engine.checkpoint"):
        loaded = Atlas.load(old, device="cpu")
    assert loaded.fingerprint == atlas.fingerprint and loaded.eos_token_ids == ()  # the loader never guesses
    assert any("atlas convert" in r.getMessage() and str(old) in r.getMessage() for r in caplog.records)

    code, out = run_cli("convert", str(old), str(new))
    assert code == 0, out
    doc = config_doc(new)
    assert doc["model_type"] == "atlas" and doc["training"] == {"steps": 7}
    assert doc["fingerprint"] == atlas.fingerprint
    assert same_tensors(old / "model.safetensors", new / "model.safetensors")  # bit for bit
    assert (new / "tokenizer.json").read_bytes() == (old / "tokenizer.json").read_bytes()
    # No generation_config.json in the old folder: convert writes the tokenizer's end of sequence.
    from tokenizers import Tokenizer

    eos = json.loads((new / "generation_config.json").read_text())["eos_token_id"]
    assert eos == Tokenizer.from_file(str(old / "tokenizer.json")).token_to_id("<|endoftext|>")
    converted = Atlas.load(new, device="cpu")
    assert converted.fingerprint == atlas.fingerprint and converted.eos_token_ids == (eos,)
    assert not read_checkpoint(new).legacy
    # Never over an existing checkpoint; with --dtype, the weights are cast.
    code, out = run_cli("convert", str(old), str(new))
    assert code == 2 and "already exists" in out
    code, out = run_cli("convert", str(new), str(tmp_path / "half"), "--dtype", "bfloat16")
    assert code == 0, out
    assert read_checkpoint(tmp_path / "half").dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# Bad checkpoints: one CheckpointError naming the file and the fix
# ---------------------------------------------------------------------------------------------


def _edit_config(**changes: object) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        doc = config_doc(path)
        doc.update(changes)
        (path / "config.json").write_text(json.dumps(doc))
    return edit


def _truncate(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:-100])


def _flip_a_weight_byte(path: Path) -> None:
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-5] ^= 0x40
    (path / "model.safetensors").write_bytes(bytes(data))


def _no_model_type(path: Path) -> None:
    doc = config_doc(path)
    del doc["model_type"]
    (path / "config.json").write_text(json.dumps(doc))


def _second_shard(path: Path) -> str:
    """Save the folder's model again in shards; the name of the second."""
    save_checkpoint(load_checkpoint(path), path, max_shard_bytes=20_000)
    return sorted(p.name for p in path.glob("model-*.safetensors"))[1]


def _drop_shard(path: Path) -> str:
    shard = _second_shard(path)
    (path / shard).unlink()
    return shard


def _misplace_in_index(path: Path) -> None:
    shard = _second_shard(path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["embed.weight"] != shard
    index["weight_map"]["embed.weight"] = shard
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


#: How a folder is spoiled (returning the file to name, if not the one listed), the file the error
#: names, and words of its message.
BAD: dict[str, tuple[Callable[[Path], object], str | None, str]] = {
    "no-config": (lambda p: (p / "config.json").unlink(), "config.json", "missing"),
    "config-not-json": (lambda p: (p / "config.json").write_text("{"), "config.json", "JSON"),
    "no-weights": (lambda p: (p / "model.safetensors").unlink(), "model.safetensors", "missing"),
    "shapes": (_edit_config(d_model=64), "model.safetensors", "does not match config.json"),
    "fewer-layers": (_edit_config(n_layers=1), "model.safetensors", "unexpected"),
    "bad-field": (_edit_config(chunk_size=0), "config.json", "chunk_size"),
    "model-type": (_edit_config(model_type="llama"), "config.json", "llama"),
    "no-model-type": (_no_model_type, "config.json", "model_type"),
    "newer-format": (_edit_config(format_version=2), "config.json", "upgrade"),
    "format-not-int": (_edit_config(format_version="1"), "config.json", "format_version"),
    "unknown-key": (_edit_config(hidden_size=768), "config.json", "'hidden_size'"),
    "truncated": (_truncate, "model.safetensors", "truncated"),
    "garbage": (lambda p: (p / "model.safetensors").write_bytes(b"not a safetensors file"),
                "model.safetensors", "safetensors"),
    "damaged-bytes": (_flip_a_weight_byte, "model.safetensors", "fingerprint"),
    "tokenizer-too-big": (lambda p: bpe_tokenizer(p, vocab=300), "tokenizer.json", "300 tokens"),
    "tokenizer-unreadable": (lambda p: (p / "tokenizer.json").write_text("{}"), "tokenizer.json",
                             "tokenizers"),
    "eos-outside-vocab": (lambda p: (p / "generation_config.json").write_text('{"eos_token_id": [5, 256]}'),
                          "generation_config.json", "eos_token_id"),
    "shard-missing": (_drop_shard, None, "index"),  # the file: the shard _drop_shard names
    "index-disagrees": (_misplace_in_index, "model.safetensors.index.json", "embed.weight"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoints_raise_one_error_naming_the_file(atlas: Atlas, tmp_path: Path, case: str) -> None:
    spoil, file, words = BAD[case]
    save_checkpoint(atlas.model, tmp_path)
    named = spoil(tmp_path)
    file = named if isinstance(named, str) else file
    with pytest.raises(CheckpointError) as caught:
        Atlas.load(tmp_path, device="cpu")
    e = caught.value
    assert isinstance(e, ValueError) and e.code == "checkpoint_invalid"
    assert e.file == tmp_path / file, str(e)
    message = str(e)
    assert "\n" not in message and str(tmp_path / file) in message and "Fix: " in message
    assert words in message, message


def test_a_missing_folder_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        Atlas.load(tmp_path / "nowhere", device="cpu")


# ---------------------------------------------------------------------------------------------
# `atlas serve` with a bad checkpoint: one line, never a traceback
# ---------------------------------------------------------------------------------------------


def test_atlas_serve_refuses_a_bad_checkpoint_in_one_line(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "model")
    _edit_config(model_type="llama")(model)
    srv = ServerProcess(tmp_path / "work", {"ATLAS_MODEL": str(model)})
    srv.spawn()
    try:
        assert srv.proc is not None
        assert srv.proc.wait(60) == 2
    finally:
        srv.kill()
    log = srv.log()
    assert "Traceback" not in log, log
    lines = [line for line in log.splitlines() if "checkpoint file" in line]
    assert len(lines) == 1 and str(model / "config.json") in lines[0] and "Fix: " in lines[0], log


def test_atlas_serve_reports_damaged_weights_on_ready_and_in_the_log(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "model")
    _flip_a_weight_byte(model)  # only reading the bytes shows it: the background loader's error
    work = tmp_path / "work"
    srv = ServerProcess(work, {"ATLAS_MODEL": str(model)})
    srv.spawn()
    try:
        deadline = time.monotonic() + 60
        body: dict = {}
        r = None
        while time.monotonic() < deadline:
            assert srv.proc is not None and srv.proc.poll() is None, srv.log()
            try:
                r = httpx.get(srv.url + "/ready", timeout=2)
                body = r.json()
                if "cannot be loaded" in body["error"]["message"]:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert r is not None and r.status_code == 503 and body["error"]["code"] == "checkpoint_invalid", body
        assert "fingerprint" in body["error"]["message"] and "model.safetensors" in body["error"]["message"]
        assert srv.stop() is not None
    finally:
        srv.kill()
        stop_embedded_redis(work / "data")
    log = srv.log()
    assert "Traceback" not in log, log
    assert re.search(r"could not load the model: checkpoint file .*model\.safetensors: .*fingerprint",
                     log), log


# ---------------------------------------------------------------------------------------------
# The trainer writes the format
# ---------------------------------------------------------------------------------------------


def test_the_trainer_writes_the_format_with_its_state_in_a_subfolder(tmp_path: Path) -> None:
    from atlas.training.trainer import TrainConfig, run_training

    model = tiny_config(d_model=16, n_heads=2, n_layers=1, chunk_size=16, swa_window=32, omega_window=2)
    cfg = TrainConfig(name="t", seed=3, steps=1, device="cpu", out_dir=tmp_path / "run",
                      model=model.model_dump(),
                      data=dict(min_len=300, max_len=300, tokens_per_batch=300, tasks={"passkey": 1.0}))
    out = run_training(cfg, progress=False)
    assert out == tmp_path / "run" / "model"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json",
                                                     "model.safetensors", "training_state"]
    assert [p.name for p in (out / "training_state").iterdir()] == ["trainer.pt"]
    assert not (tmp_path / "run" / "trainer.pt").exists()
    doc = config_doc(out)
    assert doc["model_type"] == "atlas" and doc["training"]["steps"] == 1 and doc["training"]["name"] == "t"
    ckpt = read_checkpoint(out)
    assert not ckpt.legacy and ckpt.fingerprint == fingerprint(load_checkpoint(out))


# ---------------------------------------------------------------------------------------------
# `atlas init`
# ---------------------------------------------------------------------------------------------


def test_atlas_init_with_a_bpe_tokenizer_then_load_and_generate(tmp_path: Path) -> None:
    tok = bpe_tokenizer(tmp_path / "tok", vocab=320, special=("<pad>", "<|endoftext|>"))
    tok_cfg = {"eos_token": {"content": "<|endoftext|>", "special": True}, "pad_token": "<pad>",
               "chat_template": "{{ messages }}"}
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    small = tiny_config(vocab_size=256)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"model_type": "atlas", "format_version": 1,
                                  **small.model_dump(mode="json")}))
    out = tmp_path / "my-model"
    code, text = run_cli("init", "--config", str(config), "--tokenizer", str(tok), "--out", str(out),
                         "--seed", "3")
    assert code == 0, text
    assert f"ATLAS_MODEL={out} atlas serve" in " ".join(text.split())
    # The vocabulary is the tokenizer's (more than the config's); the tokenizer files are copied;
    # the end of sequence is tokenizer_config.json's eos_token.
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(tok)).get_vocab_size()
    atlas = Atlas.load(out, device="cpu")
    assert size > 256 and atlas.config.vocab_size == size == atlas.tokenizer.vocab_size
    assert (out / "tokenizer.json").read_bytes() == tok.read_bytes()
    assert atlas.checkpoint is not None and atlas.checkpoint.tokenizer_config == tok_cfg
    eos = Tokenizer.from_file(str(tok)).token_to_id("<|endoftext|>")
    assert atlas.eos_token_ids == (eos,)
    # In float32 the weights are Atlas.from_config's for the same seed.
    same = Atlas.from_config(ModelConfig(**{**small.model_dump(), "vocab_size": size}), seed=3, device="cpu")
    assert atlas.fingerprint == same.fingerprint
    gen = atlas.generate(atlas.new_state(), "the cat", SamplingParams(max_tokens=5, temperature=0))
    tokens = list(gen)
    assert 1 <= len(tokens) <= 5 and gen.finish_reason in ("stop", "length")
    # A config that says more keeps its vocabulary; an existing folder is refused.
    config.write_text(json.dumps({"model_type": "atlas", "format_version": 1,
                                  **small.model_dump(mode="json"), "vocab_size": 512}))
    assert init_checkpoint(config, tmp_path / "again", tok, seed=3).config.vocab_size == 512
    code, text = run_cli("init", "--config", str(config), "--out", str(out))
    assert code == 2 and "already exists" in text


def test_atlas_init_without_a_tokenizer_and_in_bfloat16(tmp_path: Path) -> None:
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"model_type": "atlas", "format_version": 1, "d_model": 32, "n_heads": 2,
                                  "n_layers": 1, "vocab_size": 300}))  # missing fields: the defaults
    ckpt = init_checkpoint(config, tmp_path / "m", dtype=torch.bfloat16)
    assert ckpt.config.vocab_size == 300 and ckpt.dtype == torch.bfloat16
    assert ckpt.eos_token_ids == () and not (tmp_path / "m" / "tokenizer.json").exists()
    atlas = Atlas.load(tmp_path / "m", device="cpu", dtype=torch.bfloat16)
    gen = atlas.generate(atlas.new_state(), "hi", SamplingParams(max_tokens=3, temperature=0))
    assert len(list(gen)) == 3


def test_the_end_of_sequence_rule(tmp_path: Path) -> None:
    bpe = bpe_tokenizer(tmp_path / "a", special=("<s>", "</s>"))
    assert guess_eos_token_id(bpe) == 1  # </s>, a special token
    assert guess_eos_token_id(bpe, {"eos_token": "<s>"}) == 0  # tokenizer_config.json names it
    assert guess_eos_token_id(bpe, {"eos_token": "<nowhere>"}) == 1
    bert = word_level_tokenizer(tmp_path / "b", special=("[CLS]", "[SEP]"))
    assert guess_eos_token_id(bert) == 2
    assert guess_eos_token_id(word_level_tokenizer(tmp_path / "c", special=())) is None
    assert guess_eos_token_id(None) is None  # the byte tokenizer


def test_the_shipped_configs_have_the_documented_sizes() -> None:
    docs = (ROOT / "docs" / "formats.md").read_text()
    for name, count in SHIPPED.items():
        cfg = read_model_config(ROOT / "configs" / "models" / f"{name}.json")
        assert count_parameters(cfg) == count, name
        assert cfg.vocab_size == 32000 and f"`{name}.json`" in docs and f"{count:,}" in docs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SHIPPED))
def test_atlas_init_of_each_shipped_size_is_served_in_bfloat16(tmp_path: Path, name: str) -> None:
    """What a user runs: `atlas init` with a shipped config, then `atlas serve --dtype bfloat16` on
    the CPU answering a completion; /v1/models reports the size."""
    tok = bpe_tokenizer(tmp_path / "tok", vocab=400)
    out = tmp_path / name
    try:
        code, text = run_cli("init", "--config", str(ROOT / "configs" / "models" / f"{name}.json"),
                             "--tokenizer", str(tok), "--out", str(out), "--dtype", "bfloat16")
        assert code == 0, text
        with running_server(tmp_path / "srv", {"ATLAS_MODEL": str(out), "ATLAS_TORCH_THREADS": "2"},
                            args=["--dtype", "bfloat16"], timeout_s=300) as srv:
            model = httpx.get(srv.url + "/v1/models", timeout=30).json()["data"][0]
            assert model["parameters"] == SHIPPED[name] and model["dtype"] == "bfloat16"
            r = httpx.post(srv.url + "/v1/completions", timeout=300,
                           json={"prompt": "the cat", "max_tokens": 3, "temperature": 0})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["choices"][0]["finish_reason"] in ("stop", "length")
            assert 1 <= body["usage"]["completion_tokens"] <= 3
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_init_and_convert_are_atlas_commands() -> None:
    code, out = run_cli("--help")
    assert code == 0 and "init" in out and "convert" in out
