"""Model configuration: every knob of docs/model.md in one pydantic model."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Mixer = Literal["atlas", "swa", "mag"]
Optimizer = Literal["muon", "momentum", "gd"]


def _default_layers() -> list[Mixer]:
    return ["mag"]


class ModelConfig(BaseModel):
    """Shape and hyper-parameters of an ATLAS language model.

    Defaults give the small serving model (MAG in every block)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(256, ge=2)
    d_model: int = Field(256, ge=8)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(4, ge=1)
    # Mixer per block; a single entry is repeated over all layers.
    layers: list[Mixer] = Field(default_factory=_default_layers)
    mlp_hidden: int | None = None  # SwiGLU hidden width; default 8/3 * d_model rounded to 64
    tie_embeddings: bool = True
    norm_eps: float = 1e-6

    # ATLAS memory (docs/model.md notation in comments)
    mem_depth: Literal[1, 2] = 2  # 1: M(x) = W x; 2: M(x) = x + W1 gelu(W2 x)
    mem_expansion: int = Field(4, ge=1)  # e
    poly_degree: int = Field(2, ge=1)  # p
    omega_window: int = Field(8, ge=1)  # c
    chunk_size: int = Field(64, ge=1)  # b
    optimizer: Optimizer = "muon"
    ns_steps: int = Field(5, ge=0)  # k
    eta_max: float = Field(0.5, gt=0)
    conv_kernel: int = Field(4, ge=1)
    # Initial gate biases: retention starts near 1, the rest in the middle.
    alpha_bias_init: float = 6.0
    eta_bias_init: float = 0.0
    theta_bias_init: float = 0.0
    gamma_bias_init: float = 2.0

    # Sliding-window attention
    swa_window: int = Field(256, ge=1)  # w
    rope_base: float = 10000.0
    mag_combine: Literal["gate", "add"] = "gate"

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError("d_model must be divisible by n_heads")
        if self.head_dim % 2:
            raise ValueError("head width must be even (RoPE)")
        if len(self.layers) not in (1, self.n_layers):
            raise ValueError("layers must list one mixer or one per layer")
        if any(m != "atlas" for m in self.layers) and self.swa_window < self.chunk_size:
            raise ValueError("swa_window must be >= chunk_size")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mem_hidden(self) -> int:
        return self.mem_expansion * self.head_dim

    @property
    def mixers(self) -> list[Mixer]:
        return list(self.layers) * (self.n_layers if len(self.layers) == 1 else 1)

    @property
    def ffn_hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return ((8 * self.d_model // 3) + 63) // 64 * 64

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
