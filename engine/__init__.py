"""The ATLAS engine: model, session state, tokenizer, checkpoints, sampling. Knows nothing of HTTP."""

from .api import Atlas, GeneratedToken, Generation
from .checkpoint import CheckpointError, fingerprint, load_checkpoint, save_checkpoint
from .config import ModelConfig
from .model import AtlasModel
from .sampling import SamplingParams
from .state import ForeignStateError, SessionState, StateError, StateFormatError
from .tokenizer import ByteTokenizer, load_tokenizer

__all__ = [
    "Atlas", "AtlasModel", "ByteTokenizer", "CheckpointError", "ForeignStateError", "GeneratedToken",
    "Generation", "ModelConfig", "SamplingParams", "SessionState", "StateError", "StateFormatError",
    "fingerprint", "load_checkpoint", "load_tokenizer", "save_checkpoint",
]
