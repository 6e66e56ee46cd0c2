"""vLLM's ``POST /tokenize`` and ``POST /detokenize``: the served model's tokenizer, over HTTP.

A client counts a prompt's tokens (or checks how text splits) with the very tokenizer the server
feeds the model with. Both need a key like every other API route, and the model to be loaded.

``max_model_len``: vLLM's field for the longest sequence a request may hold. An ATLAS model has no
context limit (its state has a fixed size, whatever it has read; ``/v1/models`` says
``context: "unbounded"``), so what bounds one request is this server's prompt cap,
``ATLAS_MAX_PROMPT_TOKENS``: that is the number returned (a count above it is refused by
``/v1/completions`` as ``prompt_too_long``; longer documents go into a session through ingest).

``add_special_tokens`` is accepted for vLLM's clients, and changes nothing: the server never adds
special tokens to a prompt (a session's document and the prompts after it are one token stream), so
the ids returned are exactly those a completion's prompt is fed as (``usage.prompt_tokens``).

The chat form (``messages`` instead of ``prompt``) renders the conversation with the model's chat
template (``engine/chat_template.py``, as ``/v1/chat/completions`` does), then counts that text.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, model_validator

from atlas.engine.chat_template import render_chat

from ..dependencies import Services, ServicesDep, SettingsDep, TenantDep
from ..errors import ApiError
from ..schemas import ChatMessageIn, ErrorBody, Text
from .chat import _message as chat_message  # the same message -> template input as chat completions
from .common import Responses

router = APIRouter(tags=["tokenizer"])

ERRORS: Responses = {400: {"model": ErrorBody}, 401: {"model": ErrorBody}, 404: {"model": ErrorBody},
                     415: {"model": ErrorBody}, 422: {"model": ErrorBody}, 503: {"model": ErrorBody}}

#: Above this many characters the tokenizer runs in a thread, off the event loop.
THREAD_CHARS = 16_384


class TokenizeRequest(BaseModel):
    """vLLM's two forms: ``prompt`` (text), or ``messages`` (a conversation, through the model's chat
    template). Unknown fields (``return_token_strs``, ...) are ignored, as there."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = Field(None, description="The served model's id (GET /v1/models), or omitted.")
    prompt: Text | None = Field(None, description="Text to split into the model's tokens.")
    messages: list[ChatMessageIn] | None = Field(None, description="A conversation, instead of a prompt.")
    add_generation_prompt: bool = Field(True, description="Chat form: end with the assistant's header, "
                                        "as /v1/chat/completions does.")
    add_special_tokens: bool = Field(True, description="Accepted for vLLM's clients; the server never "
                                     "adds special tokens to a prompt, so it changes nothing.")

    @model_validator(mode="after")
    def _one_form(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class TokenizeResponse(BaseModel):
    count: int = Field(description="Number of tokens.")
    max_model_len: int = Field(description="The most prompt tokens one request may carry "
                               "(ATLAS_MAX_PROMPT_TOKENS): the model itself has no context limit.")
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = Field(None, description="The served model's id, or omitted.")
    tokens: Annotated[list[int], Field(description="Token ids, each in [0, vocabulary size).")]


class DetokenizeResponse(BaseModel):
    prompt: str = Field(description="The text of the ids.")


def _check_model(model: str | None, services: Services) -> None:
    if model is not None and model != services.model_id:
        raise ApiError("model_not_found", f"model {model!r} is not served here; "
                       f"this server runs {services.model_id!r} (GET /v1/models)")


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
async def tokenize(req: TokenizeRequest, _: TenantDep, services: ServicesDep,
                   settings: SettingsDep) -> TokenizeResponse:
    """The prompt's token ids, as ``/v1/completions`` would feed them."""
    _check_model(req.model, services)
    atlas = services.atlas
    if req.messages is not None:  # a template that refuses them: ChatTemplateError, 400
        messages = [chat_message(m, i) for i, m in enumerate(req.messages)]
        prompt = render_chat(messages, atlas.chat_template, atlas.special_tokens, req.add_generation_prompt)
    else:
        prompt = req.prompt or ""
    encode = atlas.encode
    ids = await asyncio.to_thread(encode, prompt) if len(prompt) > THREAD_CHARS else encode(prompt)
    return TokenizeResponse(count=len(ids), max_model_len=settings.max_prompt_tokens, tokens=ids)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize(req: DetokenizeRequest, _: TenantDep, services: ServicesDep) -> DetokenizeResponse:
    """The text of token ids; an id outside the tokenizer's vocabulary is 400."""
    _check_model(req.model, services)
    vocab = services.atlas.tokenizer.vocab_size
    bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError("token_out_of_vocabulary", f"token id {bad} is outside the vocabulary [0, {vocab})")
    decode = functools.partial(services.atlas.decode, special=True)  # as vLLM's: /tokenize's ids back
    ids = req.tokens
    text = await asyncio.to_thread(decode, ids) if len(ids) > THREAD_CHARS else decode(ids)
    return DetokenizeResponse(prompt=text)
