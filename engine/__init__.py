"""The ATLAS engine: model, session state, tokenizer, checkpoints, sampling. Knows nothing of HTTP."""

from .threads import set_openmp_env

set_openmp_env()  # before torch loads: OpenMP reads its wait policy once (engine/threads.py)

from .api import Atlas, GeneratedToken, Generation  # noqa: E402
from .checkpoint import CheckpointError, fingerprint, load_checkpoint, save_checkpoint  # noqa: E402
from .config import ModelConfig  # noqa: E402
from .model import AtlasModel  # noqa: E402
from .sampling import SamplingParams  # noqa: E402
from .state import ForeignStateError, SessionState, StateError, StateFormatError  # noqa: E402
from .tokenizer import ByteTokenizer, load_tokenizer  # noqa: E402

__all__ = [
    "Atlas", "AtlasModel", "ByteTokenizer", "CheckpointError", "ForeignStateError", "GeneratedToken",
    "Generation", "ModelConfig", "SamplingParams", "SessionState", "StateError", "StateFormatError",
    "fingerprint", "load_checkpoint", "load_tokenizer", "save_checkpoint",
]
