"""Checkpoint folders, read, checked and written in this one module (docs/formats.md, "Checkpoint
folder"): `config.json` (flat: `model_type`, `format_version`, every ModelConfig field, the
`training` record and the weights' `fingerprint`), `model.safetensors` or its shards with
`model.safetensors.index.json`, optionally `tokenizer.json` and `tokenizer_config.json`, and
`generation_config.json`. Training-only files live in `training_state/`, which loading ignores.

The fingerprint of a model is a hash of its config and weights; every state carries the fingerprint
of the model that made it. A checkpoint that cannot be served raises `CheckpointError`, whose message
names the file and the fix.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .model import AtlasModel
from .tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

MODEL_TYPE = "atlas"
FORMAT_VERSION = 1  # the newest `format_version` this code reads and the one it writes
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TRAINING_STATE_DIR = "training_state"  # the trainer's resume state; never read by the loader
#: Keys config.json may hold beside `model_type`, `format_version` and the ModelConfig fields.
RECORD_KEYS = ("training", "fingerprint")
#: Shard size `save_checkpoint` uses unless told otherwise (Hugging Face's default, "5GB").
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
#: generation_config.json keys that become `generation_defaults` (Hugging Face's names).
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_new_tokens")

_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_FIX_CONFIG = "see docs/formats.md, \"Checkpoint folder\""


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded. The message names the file and says the fix."""

    code = "checkpoint_invalid"

    def __init__(self, file: str | Path, problem: str, fix: str):
        self.file = Path(file)
        self.problem, self.fix = problem, fix
        super().__init__(f"checkpoint file {file}: {problem}. Fix: {fix}")


# -- fingerprint ------------------------------------------------------------------------------------


def fingerprint_tensors(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> str:
    """The hex SHA-256 of the config's canonical JSON, then of each tensor in name order: its
    "name:dtype:shape" and its raw bytes (docs/formats.md, "The model fingerprint")."""
    h = hashlib.sha256(cfg.canonical_json().encode())
    for name, t in sorted(tensors.items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint(model: AtlasModel) -> str:
    return fingerprint_tensors(model.cfg, model.state_dict())


# -- what a folder holds ----------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A checked checkpoint folder, its tensors not yet read (`load_checkpoint` reads them)."""

    path: Path
    config: ModelConfig
    records: dict[str, Any]  # config.json's other entries: "training" (and, in the old layout, any)
    fingerprint: str | None  # of the weights as stored, if config.json records one
    weight_files: dict[str, Path]  # tensor name -> the file that holds it
    tensor_dtypes: dict[str, torch.dtype]
    tokenizer: Tokenizer
    tokenizer_config: dict[str, Any] | None  # tokenizer_config.json as read (chat_template, ...)
    generation_config: dict[str, Any] = field(default_factory=dict)  # generation_config.json as read
    legacy: bool = False  # config.json in the old {"model": {...}} layout

    @property
    def training(self) -> dict[str, Any] | None:
        return self.records.get("training")

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype as stored (the widest, should a file mix several)."""
        dtypes = set(self.tensor_dtypes.values())
        return functools.reduce(torch.promote_types, dtypes) if dtypes else torch.float32

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """generation_config.json's `eos_token_id` (an int or a list) as a tuple; () without one."""
        eos = self.generation_config.get("eos_token_id")
        return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """The sampling settings generation_config.json gives, under its names (temperature, top_p,
        top_k, max_new_tokens); `"do_sample": false` makes the default greedy (temperature 0)."""
        gc = self.generation_config
        out = {k: gc[k] for k in SAMPLING_KEYS if gc.get(k) is not None}
        if gc.get("do_sample") is False:
            out["temperature"] = 0.0
        return out


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and check everything of a checkpoint folder but the tensors' data: config.json, the
    safetensors headers against it (names, shapes, dtypes; truncated files), the shards of an index,
    the tokenizer's size, tokenizer_config.json and generation_config.json. CheckpointError if any
    is wrong. Files it does not know, and training_state/, are ignored."""
    path = Path(path)
    cfile = path / CONFIG_FILE
    if not path.is_dir():
        raise CheckpointError(path, "no such checkpoint folder",
                              "give the folder that holds config.json and model.safetensors "
                              "(`atlas init` or `atlas train` writes one)")
    if not cfile.is_file():
        raise CheckpointError(cfile, "missing, so this folder is not a checkpoint",
                              "give the folder that holds config.json and model.safetensors "
                              "(`atlas init` or `atlas train` writes one)")
    cfg, records, legacy = parse_config(read_json(cfile), cfile)
    if legacy:
        _warn_legacy(path)
    weight_files, dtypes = _check_weights(path, cfg)
    tokenizer = _read_tokenizer(path, cfg)
    tcfile = path / TOKENIZER_CONFIG_FILE
    tokenizer_config = read_json(tcfile) if tcfile.is_file() else None
    if tokenizer_config is not None and not isinstance(tokenizer_config, dict):
        raise CheckpointError(tcfile, "is not a JSON object", "write the tokenizer's settings as an object")
    gfile = path / GENERATION_CONFIG_FILE
    generation = check_generation_config(read_json(gfile), cfg, gfile) if gfile.is_file() else {}
    return Checkpoint(path, cfg, {k: v for k, v in records.items() if k != "fingerprint"},
                      records.get("fingerprint"), weight_files, dtypes, tokenizer, tokenizer_config,
                      generation, legacy)


@functools.cache
def _warn_legacy(path: Path) -> None:
    """Once per folder and process (`atlas serve` checks a folder before its loader loads it)."""
    log.warning("checkpoint %s has the old config.json layout ({\"model\": {...}}); it loads, but run "
                "`atlas convert %s NEW_DIR` to write the current format (docs/formats.md)", path, path)


def read_config(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The ModelConfig of a checkpoint folder and config.json's records ("training", "fingerprint")."""
    cfile = Path(path) / CONFIG_FILE
    if not cfile.is_file():
        raise CheckpointError(cfile, "missing, so this folder is not a checkpoint",
                              "give the folder that holds config.json and model.safetensors")
    cfg, records, _ = parse_config(read_json(cfile), cfile)
    return cfg, records


def read_model_config(file: str | Path) -> ModelConfig:
    """A model config from a config.json-format file (what `atlas init --config` takes). Its
    `training` and `fingerprint`, if any, are another model's and are ignored."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(file, "no such file",
                              "give a model config, e.g. configs/models/atlas-170m.json")
    return parse_config(read_json(file), file)[0]


def parse_config(doc: Any, file: Path) -> tuple[ModelConfig, dict[str, Any], bool]:
    """(config, records, legacy) of a config.json document; records holds "training" and
    "fingerprint" (and, in the old layout, whatever it held beside "model")."""
    if not isinstance(doc, dict):
        raise CheckpointError(file, "is not a JSON object", _FIX_CONFIG)
    if "model_type" not in doc and isinstance(doc.get("model"), dict):  # the old layout
        records = {k: v for k, v in doc.items() if k != "model"}
        _check_records(records, file)
        return _model_config(doc["model"], file), records, True
    model_type = doc.get("model_type")
    if model_type is None:
        raise CheckpointError(file, "has no \"model_type\"", f"an ATLAS config.json starts with "
                              f"\"model_type\": \"{MODEL_TYPE}\" ({_FIX_CONFIG})")
    if model_type != MODEL_TYPE:
        raise CheckpointError(file, f"\"model_type\" is {model_type!r}, and atlas-serve runs only "
                              f"\"{MODEL_TYPE}\" models", "serve this model with a server for its type")
    version = doc.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(file, f"\"format_version\" must be a positive integer, not {version!r}",
                              f"write \"format_version\": {FORMAT_VERSION}")
    if version > FORMAT_VERSION:
        raise CheckpointError(file, f"has format_version {version}, newer than this atlas-serve reads "
                              f"({FORMAT_VERSION})", "upgrade atlas-serve to a release that reads it")
    fields = set(ModelConfig.model_fields)
    unknown = [k for k in doc if k not in fields and k not in ("model_type", "format_version", *RECORD_KEYS)]
    if unknown:
        more = f" (and {unknown[1:]})" if unknown[1:] else ""
        raise CheckpointError(file, f"unknown key {unknown[0]!r}{more}",
                              "remove it or correct its spelling: config.json holds model_type, "
                              "format_version, the ModelConfig fields (docs/model.md), training and "
                              "fingerprint")
    records = {k: doc[k] for k in RECORD_KEYS if k in doc}
    _check_records(records, file)
    return _model_config({k: v for k, v in doc.items() if k in fields}, file), records, False


def _check_records(records: dict[str, Any], file: Path) -> None:
    fp = records.get("fingerprint")
    if fp is not None and not (isinstance(fp, str) and re.fullmatch(r"[0-9a-f]{64}", fp)):
        raise CheckpointError(file, "\"fingerprint\" is not 64 hex digits",
                              "remove it (it is written again by `atlas convert`)")
    if records.get("training") is not None and not isinstance(records["training"], dict):
        raise CheckpointError(file, "\"training\" is not a JSON object",
                              "remove it or restore the trainer's record")


def _model_config(fields: Any, file: Path) -> ModelConfig:
    if not isinstance(fields, dict):
        raise CheckpointError(file, "\"model\" is not a JSON object", _FIX_CONFIG)
    try:
        return ModelConfig(**fields)
    except ValidationError as e:
        what = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors())
        raise CheckpointError(file, f"not a valid model config ({what})",
                              "correct the field (docs/model.md lists them)") from e


def check_generation_config(doc: Any, cfg: ModelConfig, file: Path) -> dict[str, Any]:
    """generation_config.json as read, after checking the keys atlas uses: `eos_token_id` (null, an
    int or a list of ints in the vocabulary), temperature >= 0, 0 < top_p <= 1, top_k >= 0,
    max_new_tokens >= 1. Other keys (bos_token_id, transformers_version, ...) are kept, unused."""
    if not isinstance(doc, dict):
        raise CheckpointError(file, "is not a JSON object", "write {\"eos_token_id\": ...} (docs/formats.md)")
    eos = doc.get("eos_token_id")
    ids = [] if eos is None else [eos] if not isinstance(eos, list) else eos
    if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < cfg.vocab_size for i in ids):
        raise CheckpointError(file, f"\"eos_token_id\" {eos!r} is not an id (or list of ids) in the "
                              f"vocabulary of {cfg.vocab_size}",
                              "give the tokenizer's end-of-sequence id, or null")
    checks = {"temperature": lambda v: _number(v) and v >= 0, "top_p": lambda v: _number(v) and 0 < v <= 1,
              "top_k": lambda v: _integer(v) and v >= 0, "max_new_tokens": lambda v: _integer(v) and v >= 1}
    for key, ok in checks.items():
        if doc.get(key) is not None and not ok(doc[key]):
            raise CheckpointError(file, f"{key!r} is {doc[key]!r}, out of range",
                                  "correct or remove it (temperature >= 0, 0 < top_p <= 1, top_k >= 0, "
                                  "max_new_tokens >= 1)")
    return doc


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(file, f"is not readable JSON ({e})", "restore the file from its source") from e


def _read_tokenizer(path: Path, cfg: ModelConfig) -> Tokenizer:
    tfile = path / TOKENIZER_FILE
    try:
        tokenizer = load_tokenizer(path)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise CheckpointError(tfile, f"the tokenizers library cannot read it ({e})",
                              "replace it with the tokenizer.json the model was trained with") from e
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(tfile if tfile.exists() else path / CONFIG_FILE,
                              f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                              f"vocab_size {cfg.vocab_size} in config.json",
                              "use the tokenizer the model was trained with")
    return tokenizer


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint of `cfg` holds (built on the meta device: free)."""
    with torch.device("meta"):
        model = AtlasModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of a model of `cfg` (a tied embedding counted once), without building it."""
    with torch.device("meta"):
        return sum(p.numel() for p in AtlasModel(cfg).parameters())


def _weight_layout(path: Path) -> tuple[Path, dict[str, Path] | None]:
    """The file whose absence or damage to report, and tensor name -> shard for an index."""
    single, index = path / WEIGHTS_FILE, path / WEIGHTS_INDEX_FILE
    if single.is_file():  # as Hugging Face does, a single file wins over an index
        return single, None
    if not index.is_file():
        raise CheckpointError(single, f"missing (and no {WEIGHTS_INDEX_FILE} of shards)",
                              "copy the weights into the folder beside config.json")
    doc = read_json(index)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and Path(v).name == v and v for v in weight_map.values()):
        raise CheckpointError(index, "has no \"weight_map\" of tensor names to shard file names",
                              "write it again with save_checkpoint or `atlas convert`")
    return index, {k: path / v for k, v in weight_map.items()}


def _check_weights(path: Path, cfg: ModelConfig) -> tuple[dict[str, Path], dict[str, torch.dtype]]:
    """Tensor name -> file and dtype, from the safetensors headers, checked against the config."""
    main, shards = _weight_layout(path)
    files = sorted(set(shards.values())) if shards is not None else [main]
    where: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(file, f"missing, though {WEIGHTS_INDEX_FILE} lists it",
                                  "copy every shard the index lists into the folder")
        for name, (dtype, shape) in _header(file).items():
            if name in where:
                raise CheckpointError(file, f"tensor {name!r} is also in {where[name].name}",
                                      "save the checkpoint again")
            where[name], shapes[name] = file, shape
            if dtype not in _DTYPES:
                raise CheckpointError(file, f"tensor {name!r} has dtype {dtype}; weights are "
                                      "float32, bfloat16, float16 or float64", "save the checkpoint again")
            dtypes[name] = _DTYPES[dtype]
    if shards is not None:
        misplaced = sorted(k for k in shards.keys() | where.keys() if shards.get(k) != where.get(k))
        if misplaced:
            k = misplaced[0]
            mapped = shards[k].name if k in shards else "no file"
            found = where[k].name if k in where else "none of the shards it lists"
            more = f" ({len(misplaced)} such tensors)" if len(misplaced) > 1 else ""
            raise CheckpointError(main, f"maps tensor {k!r} to {mapped}, but it is in {found}{more}",
                                  "copy the shards and the index saved together")
    want = expected_tensors(cfg)
    missing = sorted(want.keys() - shapes.keys())
    unexpected = sorted(shapes.keys() - want.keys())
    wrong = [f"{k} is {shapes[k]}, config.json makes it {want[k]}"
             for k in sorted(want.keys() & shapes.keys()) if shapes[k] != want[k]]
    if missing or unexpected or wrong:
        parts = ([f"missing {missing[:3]}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")]
                 if missing else [])
        parts += [f"unexpected {unexpected[:3]}" + (f" and {len(unexpected) - 3} more"
                                                    if len(unexpected) > 3 else "")] if unexpected else []
        parts += wrong[:3]
        raise CheckpointError(main, f"does not match config.json ({'; '.join(parts)})",
                              "use the config.json saved with these weights")
    return where, dtypes


def _header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape) from a file's header; the file must cover every tensor."""
    try:
        with safe_open(str(file), "pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(file, f"not a readable safetensors file ({e})",
                              "the file is truncated or damaged: copy it again from its source") from e


# -- loading ---------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path | Checkpoint, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = torch.float32) -> AtlasModel:
    """The model of a checkpoint folder on `device` in `dtype` (None: the dtype as stored), in eval
    mode. The tensors are checked against config.json's fingerprint as stored, in any target dtype."""
    ckpt = path if isinstance(path, Checkpoint) else read_checkpoint(path)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(ckpt.weight_files.values())):
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(file, f"its tensors cannot be read ({e})",
                                  "the file is damaged: copy it again from its source") from e
    if ckpt.fingerprint and fingerprint_tensors(ckpt.config, tensors) != ckpt.fingerprint:
        files = sorted({f.name for f in ckpt.weight_files.values()})
        raise CheckpointError(ckpt.path / (files[0] if len(files) == 1 else WEIGHTS_INDEX_FILE),
                              "the weights do not match the fingerprint config.json records (damaged, "
                              "edited, or saved with another config.json)",
                              "copy the checkpoint again; if the weights were changed on purpose, remove "
                              "\"fingerprint\" from config.json")
    # On the meta device first: no memory and no random initialisation for weights that are loaded.
    with torch.device("meta"):
        model = AtlasModel(ckpt.config)
    model = model.to(dtype=dtype or ckpt.dtype)
    want = model.state_dict()
    for k in list(tensors):
        tensors[k] = tensors[k].to(device=device, dtype=want[k].dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


# -- writing ---------------------------------------------------------------------------------------


def save_checkpoint(model: AtlasModel, path: str | Path, dtype: torch.dtype | None = None,
                    extra: dict[str, Any] | None = None, *,
                    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES,
                    tokenizer: str | Path | None = None, tokenizer_config: str | Path | dict | None = None,
                    generation_config: dict[str, Any] | None = None) -> Path:
    """Write (or overwrite) a checkpoint folder (docs/formats.md, "Checkpoint folder").

    `dtype` casts floating weights (e.g. bf16, to ship small); the fingerprint is of the weights as
    written. `extra` holds config.json's records: only "training". Weights over `max_shard_bytes`
    (None: never) go into shards with an index. `tokenizer` is a tokenizer.json to copy in,
    `tokenizer_config` a tokenizer_config.json (file or dict) to copy in; without them, files already
    there stay. `generation_config` is written as generation_config.json (checked); without it, one
    already there stays, else `{"eos_token_id": null}` is written. training_state/ is left alone."""
    path = Path(path)
    records = dict(extra or {})
    if bad := sorted(set(records) - {"training"}):
        raise ValueError(f"config.json has no room for {bad}: its records are 'training' and "
                         "'fingerprint' (docs/formats.md, \"Checkpoint folder\")")
    cfg = model.cfg
    tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach().contiguous().cpu()
        tensors[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    tok_doc = None
    if tokenizer is not None:
        from tokenizers import Tokenizer as _Tok

        size = _Tok.from_file(str(tokenizer)).get_vocab_size()
        if size > cfg.vocab_size:
            raise ValueError(f"tokenizer {tokenizer} has {size} tokens, more than vocab_size "
                             f"{cfg.vocab_size}")
        tok_doc = Path(tokenizer).read_bytes()
    tok_cfg_doc = None
    if isinstance(tokenizer_config, (str, Path)):  # copied as it is (chat_template and all)
        tok_cfg_doc = Path(tokenizer_config).read_bytes()
        if not isinstance(json.loads(tok_cfg_doc), dict):
            raise ValueError(f"{tokenizer_config} is not a JSON object")
    elif tokenizer_config is not None:
        tok_cfg_doc = (json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n").encode()
    if generation_config is not None:
        check_generation_config(generation_config, cfg, path / GENERATION_CONFIG_FILE)
    path.mkdir(parents=True, exist_ok=True)
    _write_weights(tensors, path, max_shard_bytes)
    if tok_doc is not None:
        _write(path / TOKENIZER_FILE, tok_doc)
    if tok_cfg_doc is not None:
        _write(path / TOKENIZER_CONFIG_FILE, tok_cfg_doc)
    if generation_config is not None or not (path / GENERATION_CONFIG_FILE).exists():
        _write_json(path / GENERATION_CONFIG_FILE, generation_config or {"eos_token_id": None})
    doc = {"model_type": MODEL_TYPE, "format_version": FORMAT_VERSION, **cfg.model_dump(mode="json"),
           **records, "fingerprint": fingerprint_tensors(cfg, tensors)}
    _write_json(path / CONFIG_FILE, doc)  # last: a folder is whole once its config.json matches
    return path


def _write_weights(tensors: dict[str, torch.Tensor], path: Path, max_shard_bytes: int | None) -> None:
    """model.safetensors, or shards model-0000i-of-0000N.safetensors and their index, as Hugging Face
    writes them (tensors in state-dict order, a new shard when the next tensor would overflow one);
    weight files of an earlier save that this one does not write are removed."""
    nbytes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    total = sum(nbytes.values())
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        if max_shard_bytes is not None and groups[-1] and size + nbytes[name] > max_shard_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += nbytes[name]
    n = len(groups)
    names = [WEIGHTS_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for name, group in zip(names, groups, strict=True):
        tmp = path / f".{name}.tmp"
        save_file(group, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, _file_mode())  # safetensors creates its files private (0600)
        os.replace(tmp, path / name)
    if n > 1:
        weight_map = {k: name for name, group in zip(names, groups, strict=True) for k in group}
        _write_json(path / WEIGHTS_INDEX_FILE,
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    for old in path.iterdir():
        stale = old.name in (WEIGHTS_FILE, WEIGHTS_INDEX_FILE) or _SHARD.fullmatch(old.name)
        if stale and old.name not in names and not (n > 1 and old.name == WEIGHTS_INDEX_FILE):
            old.unlink()


@functools.cache
def _file_mode() -> int:
    """The mode a new file gets from the process's umask (read once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _write(file: Path, data: bytes) -> None:
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, file)


def _write_json(file: Path, doc: Any) -> None:
    _write(file, (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode())
