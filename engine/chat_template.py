"""Chat templates: a conversation rendered into the prompt text a model was trained on.

A checkpoint folder's `tokenizer_config.json` may carry a `chat_template` (Jinja), which is rendered
as Hugging Face transformers renders it (`apply_chat_template`): a sandboxed, immutable Jinja
environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter
that does not escape HTML, the globals `raise_exception` and `strftime_now`, and the variables
`messages`, `add_generation_prompt`, and the special tokens by name (`bos_token`, `eos_token`, ...).

A model without a template gets `PLAIN_TEMPLATE` (docs/openai.md, "Chat template"): each message as
`<|role|>` on a line of its own and its content on the next, then the assistant's header:

    <|system|>
    You are terse.
    <|user|>
    Hello
    <|assistant|>
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

#: The template of models that ship none (docs/openai.md).
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template cannot be compiled, fails while rendering, or raised on purpose
    (`raise_exception`, e.g. "roles must alternate")."""

    code = "chat_template_error"


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters (< > & '), which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template (cached: a server renders the same one for every request)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the model's chat template does not compile: {e}") from e


def render_chat(messages: Sequence[Mapping[str, Any]], template: str | None = None,
                special_tokens: Mapping[str, str] | None = None, add_generation_prompt: bool = True) -> str:
    """The prompt text of a conversation: `messages` ({"role", "content"} dicts) through `template`
    (None: PLAIN_TEMPLATE) with the special tokens (`bos_token`, `eos_token`, ...) as variables.
    ChatTemplateError if the template cannot be compiled or rendered."""
    compiled = compile_template(template or PLAIN_TEMPLATE)
    tokens = {"bos_token": "", "eos_token": "", **(special_tokens or {})}
    try:
        return compiled.render(messages=[dict(m) for m in messages],
                               add_generation_prompt=add_generation_prompt, **tokens)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template refused the messages: {e}") from e
    except Exception as e:  # the template is the model author's code: `1 // 0`, a recursion, ...
        raise ChatTemplateError(f"the chat template failed on the messages: {type(e).__name__}: {e}") from e


__all__ = ["PLAIN_TEMPLATE", "ChatTemplateError", "compile_template", "render_chat"]
