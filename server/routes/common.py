"""What the session and completion routes share: prompt and sampling limits, documented errors."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from atlas.engine import Atlas
from atlas.engine.sampling import SamplingParams

from ..errors import ApiError
from ..schemas import ErrorBody, OpenAIFields, SamplingFields
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


def sampling(req: SamplingFields, default_max_tokens: int, settings: ServerSettings, *,
             defaults: Mapping[str, Any] | None = None, max_tokens: int | None = None,
             vocab_size: int | None = None, logprobs: int | None = None,
             prompt_logprobs: int | None = None) -> SamplingParams:
    """Engine sampling parameters (the one mapping of every route's body onto SamplingParams); an
    explicit max_tokens over the cap is an error, the default is lowered to the cap. `defaults`:
    the model's (Atlas.generation_defaults, from its generation_config.json), for the fields the
    request leaves out. The OpenAI routes add their fields (n, penalties, min_p, logit_bias checked
    against `vocab_size`) and the log-probabilities they ask for."""
    defaults = defaults or {}
    asked = req.max_tokens if max_tokens is None else max_tokens
    if asked is None:
        default_max_tokens = defaults.get("max_new_tokens", default_max_tokens)
    max_tokens = min(default_max_tokens, settings.max_tokens) if asked is None else asked
    for name in ("temperature", "top_p", "top_k"):
        if name not in req.model_fields_set and name in defaults:
            req = req.model_copy(update={name: defaults[name]})
    if max_tokens > settings.max_tokens:
        raise ApiError("max_tokens_too_large",
                       f"max_tokens {max_tokens} is over this server's limit of {settings.max_tokens}")
    stop = req.stop if isinstance(req.stop, list) else ([req.stop] if req.stop else [])
    # Below 1e-3 sampling is greedy in all but name, and logits / 1e-300 overflow to inf (NaN probs).
    temperature = 0.0 if req.temperature < GREEDY_BELOW else req.temperature
    extra: dict[str, Any] = {}
    if isinstance(req, OpenAIFields):
        extra = dict(n=req.n, min_p=req.min_p, presence_penalty=req.presence_penalty,
                     frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
                     logit_bias=logit_bias(req.logit_bias, vocab_size))
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=max(0, req.top_k),
                          top_p=req.top_p, seed=req.seed, stop=stop, logprobs=logprobs,
                          prompt_logprobs=prompt_logprobs, **extra)


_TOKEN_ID = re.compile(r"[0-9]+")


def logit_bias(bias: dict[str, float] | None, vocab_size: int | None) -> dict[int, float]:
    """OpenAI's logit_bias (token id strings -> [-100, 100]) as ids; 400 for ids that are not ids of
    the vocabulary."""
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        tok = int(key) if _TOKEN_ID.fullmatch(key.strip()) else -1  # not isdigit(): "²" is a digit
        if tok < 0 or (vocab_size is not None and tok >= vocab_size):
            raise ApiError("unsupported_parameter", f"logit_bias: {key!r} is not a token id of this "
                           f"model (0 to {(vocab_size or 1) - 1})")
        if not -100.0 <= value <= 100.0:
            raise ApiError("unsupported_parameter", f"logit_bias: {value} for token {key} is outside "
                           "[-100, 100]")
        out[tok] = float(value)
    return out


#: Fields of OpenAI's and vLLM's requests this server knows and does not honour, with the values
#: that ask for nothing (sent by some clients by default; those pass). Any other value is refused
#: with 400 unsupported_parameter naming the field: never accepted and ignored.
REFUSED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}), "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,), "web_search_options": (None,), "reasoning_effort": (None,),
    "store": (None, False), "suffix": (None, ""), "service_tier": (None, "auto", "default"),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "guided_decoding_backend": (None,), "guided_whitespace_pattern": (None,), "structured_outputs": (None,),
    "use_beam_search": (None, False), "length_penalty": (None, 1, 1.0), "early_stopping": (None, False),
    "min_tokens": (None, 0), "stop_token_ids": (None, []), "bad_words": (None, []),
    "allowed_token_ids": (None,), "ignore_eos": (None, False), "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True), "spaces_between_special_tokens": (None, True),
    "prompt_logprobs": (None,), "truncate_prompt_tokens": (None,), "priority": (None, 0),
    "add_special_tokens": (None, False), "return_tokens_as_token_ids": (None, False),
    "chat_template": (None,), "chat_template_kwargs": (None, {}), "documents": (None, []),
    "add_generation_prompt": (None, True), "continue_final_message": (None, False),
    "echo": (None, False),  # on chat (completions honours it)
}


def refuse_unsupported(req: OpenAIFields) -> None:
    """400 unsupported_parameter for the first field the server cannot honour."""
    extra = req.model_extra or {}
    for name, neutral in REFUSED.items():
        if name in extra and not any(_same(extra[name], v) for v in neutral):
            raise ApiError("unsupported_parameter", f"{name}: not supported by this server "
                           "(docs/openai.md lists what is)")
    if req.stream_options is not None and req.stream_options.continuous_usage_stats:
        raise ApiError("unsupported_parameter", "stream_options.continuous_usage_stats: not supported")
    best_of = getattr(req, "best_of", None)
    if best_of is not None and best_of != req.n:
        raise ApiError("unsupported_parameter", f"best_of: only equal to n ({req.n}) is supported")
    if req.commit and req.session_id is None:
        raise ApiError("unsupported_parameter", "commit: needs a session_id (the session to append to)")
    if req.commit and req.n != 1:
        raise ApiError("unsupported_parameter", "commit: only with n = 1 (which choice would be kept?)")


def _same(a: Any, b: Any) -> bool:
    # bool is an int in Python: `0 == False`; a neutral False must not pass a 0, nor 1 a True.
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


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


# -- OpenAI's shapes of log-probabilities ---------------------------------------------------------------

def token_text(atlas: Atlas, token: int) -> str:
    """A token's text in log-probability entries; a piece of a character, which has no text, is
    written as OpenAI writes it: ``bytes:\\xe2\\x80``."""
    data = atlas.token_bytes(token)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def text_offsets(atlas: Atlas, ids: list[int]) -> tuple[str, list[int]]:
    """The text of `ids` and where each token's text starts in it (streamed decoding: a token that
    completes a character starts where the character does)."""
    decoder = atlas.tokenizer.stream_decoder(special=True)  # a prompt's special tokens are its text
    text, offsets = "", []
    for tok in ids:
        offsets.append(len(text))
        text += decoder.push(tok)
    return text + decoder.flush(), offsets
