"""`atlas tokenizer train`: a byte-level BPE tokenizer (GPT-2's scheme) learned from local text files
with the `tokenizers` library, written as the `tokenizer.json` (and `tokenizer_config.json`) that
`atlas init --tokenizer` copies into a checkpoint and the server reads (engine/tokenizer.py)."""

from __future__ import annotations

import json
from pathlib import Path

from .data import expand_files, iter_texts

#: The end-of-sequence token a trained tokenizer gets (one of the names `atlas init` looks for,
#: training/authoring.py EOS_TOKENS; tokenizer_config.json names it too).
EOS_TOKEN = "<|endoftext|>"


def train_tokenizer(files: list[str], vocab_size: int, out: str | Path, min_frequency: int = 2,
                    text_field: str = "text") -> Path:
    """Learn a tokenizer of `vocab_size` tokens (the end-of-sequence token included) from the files
    (txt, jsonl, parquet, read as the corpus loader reads them) and write it to `out` (a
    tokenizer.json), with tokenizer_config.json beside it naming the end-of-sequence token.

    Byte-level BPE: merges over the 256 bytes, so any text encodes, no token is unknown, and
    decoding gives the bytes back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [EOS_TOKEN]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"--vocab {vocab_size}: a byte-level tokenizer needs at least "
                         f"{256 + len(specials)} tokens")
    paths = expand_files(files)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(iter_texts(paths, text_field), trainer=trainer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    config = {"eos_token": EOS_TOKEN, "tokenizer_class": "PreTrainedTokenizerFast",
              "clean_up_tokenization_spaces": False}
    out.with_name("tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
