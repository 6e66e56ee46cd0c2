"""New checkpoint folders: `atlas init` (random weights of a config's shape, for a tokenizer) and
`atlas convert` (an older or current folder rewritten in the current layout). The folder format
itself is `atlas.engine.checkpoint`'s (docs/formats.md, "Checkpoint folder")."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from atlas.engine.checkpoint import (
    CONFIG_FILE,
    DEFAULT_MAX_SHARD_BYTES,
    GENERATION_CONFIG_FILE,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    read_checkpoint,
    read_json,
    read_model_config,
    save_checkpoint,
)
from atlas.engine.config import ModelConfig
from atlas.engine.model import AtlasModel

log = logging.getLogger(__name__)

#: Special tokens taken for the end of sequence, in this order, when tokenizer_config.json names none.
EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|eos|>", "<eos>", "[SEP]")


def guess_eos_token_id(tokenizer_file: str | Path | None, tokenizer_config: dict | None = None) -> int | None:
    """The end-of-sequence id a tokenizer has, if it can tell: tokenizer_config.json's `eos_token`,
    else the first special token of EOS_TOKENS it holds. None for the byte tokenizer (no file)."""
    if tokenizer_file is None:
        return None
    from tokenizers import Tokenizer as _Tok

    tok = _Tok.from_file(str(tokenizer_file))
    eos = (tokenizer_config or {}).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if isinstance(eos, str) and (found := tok.token_to_id(eos)) is not None:
        return found
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    return next((specials[name] for name in EOS_TOKENS if name in specials), None)


def new_model(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> AtlasModel:
    """A randomly initialised model on the CPU, built directly in `dtype` (a 760M-parameter model in
    bfloat16 never needs its 3 GB in float32). In float32 it equals `Atlas.from_config(cfg, seed)`."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = AtlasModel(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.to(dtype=dtype).eval()


def init_checkpoint(config_file: str | Path, out: str | Path, tokenizer_file: str | Path | None = None,
                    tokenizer_config_file: str | Path | None = None, seed: int = 0,
                    dtype: torch.dtype = torch.float32,
                    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES) -> Checkpoint:
    """`atlas init`: a randomly initialised checkpoint folder of the config file's shape. The
    vocabulary is the tokenizer's unless the config says more; the tokenizer (none: the byte
    tokenizer) and its tokenizer_config.json (by default the one beside it, if any) are copied; the
    end-of-sequence id is `guess_eos_token_id`'s. Refuses a folder that already holds config.json."""
    out = Path(out)
    if (out / CONFIG_FILE).exists():
        raise CheckpointError(out / CONFIG_FILE, "already exists",
                              "choose a new --out folder, or delete this one")
    cfg = read_model_config(config_file)
    if tokenizer_config_file is None and tokenizer_file is not None:
        beside = Path(tokenizer_file).with_name(TOKENIZER_CONFIG_FILE)
        tokenizer_config_file = beside if beside.is_file() else None
    tok_cfg = read_json(Path(tokenizer_config_file)) if tokenizer_config_file is not None else None
    if tok_cfg is not None and not isinstance(tok_cfg, dict):
        raise CheckpointError(Path(str(tokenizer_config_file)), "is not a JSON object",
                              "give a tokenizer_config.json")
    vocab = 256
    if tokenizer_file is not None:
        from tokenizers import Tokenizer as _Tok

        try:
            vocab = _Tok.from_file(str(tokenizer_file)).get_vocab_size()
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
            raise CheckpointError(tokenizer_file, f"the tokenizers library cannot read it ({e})",
                                  "give a tokenizer.json (Hugging Face tokenizers format)") from e
    if vocab > cfg.vocab_size:
        cfg = ModelConfig(**{**cfg.model_dump(), "vocab_size": vocab})
    eos = guess_eos_token_id(tokenizer_file, tok_cfg)
    save_checkpoint(new_model(cfg, seed, dtype), out, max_shard_bytes=max_shard_bytes,
                    tokenizer=tokenizer_file, tokenizer_config=tokenizer_config_file,
                    generation_config={"eos_token_id": eos})
    return read_checkpoint(out)


def convert_checkpoint(src: str | Path, dst: str | Path, dtype: torch.dtype | None = None,
                       max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES) -> Checkpoint:
    """`atlas convert`: write checkpoint `src` (old layout or current) as a current folder `dst`,
    weights unchanged unless `dtype` casts them. Its tokenizer files are copied; without a
    generation_config.json, one is written with `guess_eos_token_id`'s id. training_state/ and the
    old layout's other entries are not carried. Refuses a `dst` that already holds config.json."""
    src, dst = Path(src), Path(dst)
    if (dst / CONFIG_FILE).exists():
        raise CheckpointError(dst / CONFIG_FILE, "already exists", "convert into a new folder")
    ckpt = read_checkpoint(src)
    if dropped := sorted(set(ckpt.records) - {"training"}):
        log.warning("config.json entries %s of %s are not part of the format; not carried", dropped, src)
    tok, tok_cfg = src / TOKENIZER_FILE, src / TOKENIZER_CONFIG_FILE
    generation = ckpt.generation_config if (src / GENERATION_CONFIG_FILE).is_file() else {
        "eos_token_id": guess_eos_token_id(tok if tok.is_file() else None, ckpt.tokenizer_config)}
    training = {"training": ckpt.training} if ckpt.training is not None else None
    save_checkpoint(load_checkpoint(ckpt, dtype=None), dst, dtype=dtype, extra=training,
                    max_shard_bytes=max_shard_bytes, tokenizer=tok if tok.is_file() else None,
                    tokenizer_config=tok_cfg if tok_cfg.is_file() else None, generation_config=generation)
    return read_checkpoint(dst)
