"""Python SDK for the ATLAS inference server: sessions, resumable ingest, streaming generation.

Speaks HTTP only (httpx + pydantic); it never imports torch or the server.
"""

from ._core import KEEP, AsyncTokenStream
from .client import AsyncAtlasClient, AtlasClient, TokenStream
from .errors import AtlasError, Busy, Conflict, NotFound, Unauthorized, Unreachable
from .models import ChatCompletion, GenerateDone, IngestProgress, Session, SessionPage, Token, Usage

__all__ = ["AtlasClient", "AsyncAtlasClient", "TokenStream", "AsyncTokenStream", "AtlasError", "Busy",
           "Conflict", "NotFound", "Unauthorized", "Unreachable", "GenerateDone", "IngestProgress",
           "Session", "SessionPage", "Token", "Usage", "ChatCompletion", "KEEP"]
__version__ = "0.1.0"
