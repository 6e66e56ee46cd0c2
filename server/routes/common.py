"""What the session and completion routes share: id checks, prompt and sampling limits."""

from __future__ import annotations

import re

from fastapi import Path

from atlas.engine.sampling import SamplingParams

from ..app import Engine
from ..errors import ApiError
from ..schemas import ErrorBody, SamplingFields
from ..settings import ServerSettings

GREEDY_BELOW = 1e-3
_SID = re.compile(r"[A-Za-z0-9_-]{1,128}")

ERRORS = {401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 422: {"model": ErrorBody},
          429: {"model": ErrorBody}, 503: {"model": ErrorBody}}
GEN_ERRORS = {**ERRORS, 400: {"model": ErrorBody}, 409: {"model": ErrorBody}}


def not_found(sid: str) -> ApiError:
    return ApiError(404, "session_not_found", f"no session {sid}")


def session_id(sid: str = Path(description="Session id.")) -> str:
    """An id the store could hold; anything else cannot exist (404, not a 422)."""
    if not _SID.fullmatch(sid):
        raise not_found(sid[:140])
    return sid


def sampling(req: SamplingFields, default_max_tokens: int, settings: ServerSettings) -> SamplingParams:
    """Engine sampling parameters; an explicit max_tokens over the cap is an error, the default is
    lowered to the cap."""
    max_tokens = min(default_max_tokens, settings.max_tokens) if req.max_tokens is None else req.max_tokens
    if max_tokens > settings.max_tokens:
        raise ApiError(400, "max_tokens_too_large",
                       f"max_tokens {max_tokens} is over this server's limit of {settings.max_tokens}")
    stop = req.stop if isinstance(req.stop, list) else ([req.stop] if req.stop else [])
    # Below 1e-3 sampling is greedy in all but name, and logits / 1e-300 overflow to inf (NaN probs).
    temperature = 0.0 if req.temperature < GREEDY_BELOW else req.temperature
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=max(0, req.top_k),
                          top_p=req.top_p, seed=req.seed, stop=stop)


def prompt_ids(eng: Engine, prompt: str | list[int], settings: ServerSettings) -> list[int]:
    """Token ids of a prompt, within the model's vocabulary and the prompt limit."""
    if isinstance(prompt, str):
        if len(prompt) > 8 * settings.max_prompt_tokens:  # no tokenizer makes fewer than 1 per 8 chars
            raise _too_long(settings)
        ids = eng.atlas.encode(prompt)
    else:
        vocab = eng.atlas.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ApiError(422, "invalid_request", f"prompt token ids must be in [0, {vocab})")
        ids = list(prompt)
    if len(ids) > settings.max_prompt_tokens:
        raise _too_long(settings)
    return ids


def _too_long(settings: ServerSettings) -> ApiError:
    return ApiError(400, "prompt_too_long", f"the prompt is over {settings.max_prompt_tokens} tokens; "
                    "stream long documents into a session with /ingest instead")
