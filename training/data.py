"""Text corpora for `atlas train`: local files (txt, jsonl, parquet) streamed through Hugging Face
`datasets` (no hub), tokenised on the fly with the model's tokenizer, packed into rows and spread
over the micro-batches of each optimiser step.

The data a step sees depends on the config (`batch_rows`, `micro_batches`), never on how many
processes run it: micro-batch slot k of P reads the records k, k + P, k + 2P, ... of the corpus (or
whole files, when the files divide evenly: `datasets.distributed.split_dataset_by_node`), joins their
tokens into one stream and cuts rows of `seq_len + 1` tokens from it, each starting at the last
token of the row before (every token is predicted once). A process runs the slots given to it, so
one process with P micro-batches and P processes with one each compute the same step. Each slot's
position (the `datasets` iterator's own state, the epoch and the tokens not yet cut) is saved with
the checkpoint, so a resumed run reads on from the same token.
"""

from __future__ import annotations

import copy
import glob
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from atlas.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from datasets import IterableDataset  # type: ignore[import-untyped]

#: The `datasets` builder of each file type. txt files are read by line (line breaks kept), so a
#: long file streams; their lines join back into the text with no separator.
BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
            ".parquet": "parquet"}


class CorpusConfig(BaseModel):
    """`[corpus]` of a training config: train next-token prediction on these files."""

    model_config = ConfigDict(extra="forbid")

    files: list[str] = Field(min_length=1)  # paths or glob patterns, relative to the working directory
    text_field: str = "text"  # the field (jsonl) or column (parquet) that holds each document
    seq_len: int = Field(512, ge=2)  # tokens a row predicts (a row holds seq_len + 1)
    batch_rows: int = Field(16, ge=1)  # rows per optimiser step, all processes together
    # After each jsonl / parquet document, the tokenizer's end-of-sequence token (if it has one).
    separate_documents: bool = True

    @field_validator("files")
    @classmethod
    def _known_types(cls, files: list[str]) -> list[str]:
        for f in files:
            if Path(f).suffix.lower() not in BUILDERS:
                raise ValueError(f"{f}: corpus files are {', '.join(sorted(BUILDERS))}")
        return files


def import_datasets() -> Any:
    """The `datasets` library, kept offline (local files only); a clear error without it."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError as e:  # an optional dependency: pip install 'atlas-serve[train]'
        raise ImportError("training on text files needs the `datasets` library: "
                           "pip install 'atlas-serve[train]' (or pip install datasets)") from e
    datasets.disable_progress_bars()
    return datasets


def expand_files(patterns: list[str]) -> list[Path]:
    """Every file the patterns name, each pattern's matches sorted (a fixed order on every rank)."""
    files: list[Path] = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        found = [f for f in found if Path(f).is_file()]
        if not found:
            raise FileNotFoundError(f"corpus file {pattern}: no such file")
        if bad := [f for f in found if Path(f).suffix.lower() not in BUILDERS]:
            raise ValueError(f"{bad[0]}: text files are {', '.join(sorted(BUILDERS))}")
        files += [Path(f) for f in found]
    return files


def open_corpus(files: list[Path], text_field: str = "text") -> IterableDataset:
    """One streaming dataset of {"text", "document_end"} over the files (txt by line, jsonl and
    parquet by record; `document_end` is true after a whole document, false after a line)."""
    datasets = import_datasets()
    parts = []
    for builder in dict.fromkeys(BUILDERS[f.suffix.lower()] for f in files):
        paths = [str(f) for f in files if BUILDERS[f.suffix.lower()] == builder]
        kw = {"keep_linebreaks": True} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=paths, split="train", streaming=True, **kw)
        field = "text" if builder == "text" else text_field
        ds = ds.select_columns([field])
        if field != "text":
            ds = ds.rename_column(field, "text")
        ends = builder != "text"
        parts.append(ds.map(lambda _, ends=ends: {"document_end": ends}))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def iter_texts(files: list[Path], text_field: str = "text") -> Iterator[str]:
    """The corpus's texts in order (what `atlas tokenizer train` learns from)."""
    for example in open_corpus(files, text_field):
        if example["text"]:
            yield example["text"]


class TokenStream:
    """The rows of one micro-batch slot (see the module's docstring)."""

    def __init__(self, make_dataset: Callable[[], IterableDataset], slot: int, slots: int,
                 encode: Callable[[str], list[int]], separator: int | None, row_len: int):
        self.slot, self.slots, self.row_len = slot, slots, row_len
        self._make, self._encode, self._sep = make_dataset, encode, separator
        self.epoch = 0
        self._position: dict[str, Any] | None = None  # the iterator's state_dict; None: the epoch's start
        self._buffer: list[int] = []  # tokens read and not yet cut into rows
        self._examples: Iterator[dict[str, Any]] | None = None

    def _iterate(self) -> Iterator[dict[str, Any]]:
        from datasets.distributed import split_dataset_by_node  # type: ignore[import-untyped]

        while True:
            ds = split_dataset_by_node(self._make(), rank=self.slot, world_size=self.slots)
            if self._position is not None:
                ds.load_state_dict(self._position)
            read = False
            for example in ds:
                # Taken before the example is handed on: a checkpoint after the caller has used it
                # resumes with the next one.
                self._position = ds.state_dict()
                read = True
                yield example
            if not read and self._position is None:
                raise ValueError(f"micro-batch slot {self.slot} of {self.slots} gets no text: the corpus "
                                 f"has fewer files or records than micro-batches")
            self.epoch, self._position = self.epoch + 1, None

    def rows(self, n: int) -> Tensor:
        """The next n rows, (n, seq_len + 1) token ids."""
        need = (n - 1) * (self.row_len - 1) + self.row_len
        if self._examples is None:
            self._examples = self._iterate()
        while len(self._buffer) < need:
            example = next(self._examples)
            self._buffer += self._encode(example["text"])
            if example["document_end"] and self._sep is not None:
                self._buffer.append(self._sep)
        step = self.row_len - 1
        out = torch.tensor([self._buffer[i * step:i * step + self.row_len] for i in range(n)],
                           dtype=torch.long)
        del self._buffer[:n * step]  # the last row's last token starts the next row
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": copy.deepcopy(self._position),
                "buffer": torch.tensor(self._buffer, dtype=torch.long)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self._position = int(state["epoch"]), copy.deepcopy(state["position"])
        self._buffer = [int(t) for t in state["buffer"].tolist()]
        self._examples = None


class CorpusLoader:
    """The micro-batches one process runs: slots `slots` of `n_slots`, `rows` rows each per step."""

    def __init__(self, cfg: CorpusConfig, tokenizer: Tokenizer, eos: int | None, slots: list[int],
                 n_slots: int):
        if cfg.batch_rows % n_slots:
            raise ValueError(f"corpus.batch_rows {cfg.batch_rows} is not a multiple of micro_batches "
                             f"{n_slots}")
        files = expand_files(cfg.files)
        self.n_slots, self.rows = n_slots, cfg.batch_rows // n_slots
        separator = eos if cfg.separate_documents else None
        self.streams = {k: TokenStream(lambda: open_corpus(files, cfg.text_field), k, n_slots,
                                       tokenizer.encode, separator, cfg.seq_len + 1) for k in slots}

    def next_micro_batches(self) -> list[Tensor]:
        return [stream.rows(self.rows) for stream in self.streams.values()]

    def state_dict(self) -> dict[str, Any]:
        """This process's slots' positions, by slot."""
        return {str(k): s.state_dict() for k, s in self.streams.items()}

    def load_state_dict(self, state: dict[str, Any], n_slots: int) -> None:
        """Positions of (at least) this process's slots, saved by a run with `n_slots` slots."""
        if n_slots != self.n_slots:
            raise ValueError(f"the checkpoint's data position is for {n_slots} micro-batches, this run "
                             f"has {self.n_slots}: keep micro_batches as it was")
        for k, stream in self.streams.items():
            stream.load_state_dict(state[str(k)])
