"""The ATLAS model: memory layer (reference chunk step), sliding-window attention, the LM."""

from .lm import AtlasModel, StateDict

__all__ = ["AtlasModel", "StateDict"]
