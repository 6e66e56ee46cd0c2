"""What the OpenAI-API tests share: small checkpoint folders (a byte-level one, one with a BPE
tokenizer and a ChatML-like chat template), and log-probabilities computed in process, token by
token, to hold the server's against."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from atlas.engine import Atlas, SessionState, save_checkpoint
from atlas.training.authoring import init_checkpoint

from .helpers import tiny_atlas

#: Small enough to be quick, with a chunk (8) that prompts cross, so pieces end inside chunks.
SMALL = dict(d_model=16, n_heads=2, n_layers=2, chunk_size=8, omega_window=3, swa_window=16)

#: A ChatML-like template written the way real ones are: block tags on lines of their own and
#: indented (trim_blocks / lstrip_blocks matter), raise_exception, tojson, bos_token.
CHATML = """{{ bos_token }}{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
<|im_start|>{{ message['role'] }}
{% if message.name is defined %}
name: {{ message.name | tojson }}
{% endif %}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""


def chatml_reference(messages: list[dict], bos: str = "<|endoftext|>") -> str:
    """CHATML rendered by hand, as transformers' apply_chat_template renders it."""
    out = bos
    for m in messages:
        out += f"<|im_start|>{m['role']}\n"
        if "name" in m:
            out += f"name: {json.dumps(m['name'], ensure_ascii=False)}\n"
        out += f"{m['content']}<|im_end|>\n"
    return out + "<|im_start|>assistant\n"


def byte_model(folder: Path) -> Path:
    """A float32 model with the byte tokenizer (no chat template: the plain one applies)."""
    return save_checkpoint(tiny_atlas(torch.float32, **SMALL).model, folder)


def chat_model(folder: Path) -> Path:
    """A model made with `atlas init` from a BPE tokenizer.json with ChatML's special tokens and a
    tokenizer_config.json holding CHATML (eos_token <|im_end|>)."""
    src = folder.parent / f"{folder.name}-src"
    src.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    lines = ["Hello there, how are you today?", "The assistant answers questions.",
             "Où est la gare ? Ça va très bien, merci.", "one two three four five six seven"] * 20
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "bos_token": "<|endoftext|>",
        "eos_token": {"content": "<|im_end|>", "special": True}}))
    config = {"model_type": "atlas", "format_version": 1, "vocab_size": 256, "layers": ["mag"],
              "mem_expansion": 2, "eta_max": 0.9, **SMALL}
    (src / "config.json").write_text(json.dumps(config))
    init_checkpoint(src / "config.json", folder, src / "tokenizer.json")
    return folder


def reference_logprobs(atlas: Atlas, ids: list[int], state: SessionState | None = None
                       ) -> tuple[list[float | None], list[torch.Tensor]]:
    """Each token's log-probability (log_softmax of the logits before it) and those logits' full
    log-distribution, feeding one token at a time; the first is None on a state that read nothing."""
    state = state if state is not None else atlas.new_state()
    out: list[float | None] = []
    dists = []
    for tok in ids:
        lp = torch.log_softmax(state.last_logits[0].float(), dim=-1)
        out.append(None if int(state.tokens[0]) == 0 else float(lp[tok]))
        dists.append(lp)
        state, _ = atlas.feed(state, [tok])
    return out, dists
