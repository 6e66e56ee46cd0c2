"""Python SDK for the ATLAS inference server: sessions, resumable ingest, streaming generation.

Speaks HTTP only (httpx + pydantic); it never imports torch or the server.
"""

from ._core import AsyncTokenStream
from .client import AsyncAtlasClient, AtlasClient, TokenStream
from .errors import AtlasError, Busy, Conflict, NotFound, Unauthorized, Unreachable
from .models import GenerateDone, IngestProgress, Session, Token, Usage

__all__ = ["AtlasClient", "AsyncAtlasClient", "TokenStream", "AsyncTokenStream", "AtlasError", "Busy",
           "Conflict", "NotFound", "Unauthorized", "Unreachable", "GenerateDone", "IngestProgress",
           "Session", "Token", "Usage"]
__version__ = "0.1.0"
