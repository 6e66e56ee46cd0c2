"""What the session and completion routes share: prompt and sampling limits, documented errors."""

from __future__ import annotations

from typing import Any

from atlas.engine import Atlas
from atlas.engine.sampling import SamplingParams

from ..errors import ApiError
from ..schemas import ErrorBody, SamplingFields
from ..settings import ServerSettings

GREEDY_BELOW = 1e-3

#: FastAPI's ``responses=``: extra OpenAPI responses by status code.
Responses = dict[int | str, dict[str, Any]]

ERRORS: Responses = {401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 422: {"model": ErrorBody},
                     429: {"model": ErrorBody}, 503: {"model": ErrorBody}}
GEN_ERRORS: Responses = {**ERRORS, 400: {"model": ErrorBody}, 409: {"model": ErrorBody}}
#: Routes with a JSON body add 415 (another Content-Type).
JSON_ERRORS: Responses = {**ERRORS, 415: {"model": ErrorBody}}
JSON_GEN_ERRORS: Responses = {**GEN_ERRORS, 415: {"model": ErrorBody}}


def sampling(req: SamplingFields, default_max_tokens: int, settings: ServerSettings) -> SamplingParams:
    """Engine sampling parameters; an explicit max_tokens over the cap is an error, the default is
    lowered to the cap."""
    max_tokens = min(default_max_tokens, settings.max_tokens) if req.max_tokens is None else req.max_tokens
    if max_tokens > settings.max_tokens:
        raise ApiError("max_tokens_too_large",
                       f"max_tokens {max_tokens} is over this server's limit of {settings.max_tokens}")
    stop = req.stop if isinstance(req.stop, list) else ([req.stop] if req.stop else [])
    # Below 1e-3 sampling is greedy in all but name, and logits / 1e-300 overflow to inf (NaN probs).
    temperature = 0.0 if req.temperature < GREEDY_BELOW else req.temperature
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=max(0, req.top_k),
                          top_p=req.top_p, seed=req.seed, stop=stop)


def prompt_ids(atlas: Atlas, prompt: str | list[int], settings: ServerSettings) -> list[int]:
    """Token ids of a prompt, within the model's vocabulary and the prompt limit."""
    if isinstance(prompt, str):
        if len(prompt) > 8 * settings.max_prompt_tokens:  # no tokenizer makes fewer than 1 per 8 chars
            raise _too_long(settings)
        ids = atlas.encode(prompt)
    else:
        vocab = atlas.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ApiError("invalid_request", f"prompt token ids must be in [0, {vocab})")
        ids = list(prompt)
    if len(ids) > settings.max_prompt_tokens:
        raise _too_long(settings)
    return ids


def _too_long(settings: ServerSettings) -> ApiError:
    return ApiError("prompt_too_long", f"the prompt is over {settings.max_prompt_tokens} tokens; "
                    "stream long documents into a session with /ingest instead")
