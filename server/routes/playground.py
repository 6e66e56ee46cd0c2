"""The web playground at ``/``: one static page (HTML + JS, no CDN) that drives the public API.

The page itself is open like /health (a browser must load it before it can know a key); every API
call it makes sends the key the user typed (kept in localStorage) as a Bearer token, so the
playground grants nothing the API does not.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
@router.get("/playground")
async def playground() -> FileResponse:
    """The playground page (no key needed to load it; its API calls need one)."""
    return FileResponse(STATIC / "playground.html", media_type="text/html",
                        headers={"Cache-Control": "no-cache"})
