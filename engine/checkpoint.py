"""Checkpoints: a directory with `config.json` and `model.safetensors` (and optionally a
`tokenizer.json`). The fingerprint of a model is a hash of its config and weights; every state
carries the fingerprint of the model that made it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .model import AtlasModel


def fingerprint(model: AtlasModel) -> str:
    h = hashlib.sha256(model.cfg.canonical_json().encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(model: AtlasModel, path: str | Path, dtype: torch.dtype | None = None,
                    extra: dict | None = None) -> Path:
    """Write config.json + model.safetensors; `dtype` casts floating weights (e.g. bf16 to ship small)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach().contiguous().cpu()
        tensors[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "atlas-model/1"})
    doc = {"model": model.cfg.model_dump(mode="json"), **(extra or {})}
    if dtype is None:  # the fingerprint of the weights as written, checked when loaded in their dtype
        doc["fingerprint"] = fingerprint(model)
    (path / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
    return path


def read_config(path: str | Path) -> tuple[ModelConfig, dict]:
    doc = json.loads((Path(path) / "config.json").read_text())
    return ModelConfig(**doc.pop("model")), doc


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> AtlasModel:
    cfg, meta = read_config(path)
    # Built in the target dtype first, so weights are converted once (a float64 checkpoint stays exact).
    model = AtlasModel(cfg).to(device=device, dtype=dtype)
    tensors = load_file(str(Path(path) / "model.safetensors"))
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise ValueError(f"checkpoint does not match its config: {e}") from e
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match its config: missing {missing}, unexpected {unexpected}")
    recorded = meta.get("fingerprint")
    if recorded and all(t.dtype == dtype for t in tensors.values() if t.is_floating_point()):
        if fingerprint(model) != recorded:
            raise ValueError(f"checkpoint {path} does not match its recorded fingerprint (damaged or edited)")
    return model.eval()
