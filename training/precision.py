"""bf16 training: autocast over the forward pass.

Parameters stay fp32 (the master weights AdamW updates); autocast runs the matrix products in
bf16. The memory's inner loop (the read M_W(phi(q)), the Omega gradients, Newton-Schulz, the
update) keeps the precision docs/model.md ("Precision") requires by itself: engine/model/reference_step.py
runs it outside autocast (`outside_autocast`), over the backward pass and the recomputation of
checkpointed blocks too."""

from __future__ import annotations

import torch


def autocast(device_type: str, precision: str) -> torch.autocast:
    """The forward pass's autocast: bf16 matrix products for precision "bf16", off for "fp32"."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")
