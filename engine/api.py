"""The Python API: a loaded model over session states.

    atlas = Atlas.load()                       # bundled model (or a checkpoint directory)
    state = atlas.new_state()
    state, logits = atlas.feed(state, atlas.encode("a long document ..."))
    state = atlas.ingest(state, b"... or its bytes in pieces, cut anywhere")  # the same tokens
    gen = atlas.generate(state.fork(), "Question?", SamplingParams(max_tokens=32))
    for tok in gen: print(tok.text, end="")
    data = atlas.save_state(state); state = atlas.load_state(data)

States are immutable values: feed and generate return new ones, so a state can be kept,
forked and reused freely.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import Checkpoint, fingerprint, load_checkpoint, read_checkpoint
from .config import ModelConfig
from .model import AtlasModel
from .sampling import Sampler, SamplingParams, StopMatcher, TokenLogprob, logprobs_of
from .state import SessionState, StateFormatError, carry_held, check_values, held_tensors, is_cache_key
from .tokenizer import ByteTokenizer, HeldText, Tokenizer

log = logging.getLogger(__name__)

BUNDLED_CHECKPOINT = Path(__file__).parent / "assets" / "demo-model"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" (CUDA when torch sees a GPU, else the CPU), "cpu", "cuda" or "cuda:N"; ValueError,
    saying why, for another name or a GPU this torch cannot use."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = torch.device("meta")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r}: ATLAS runs on auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: this torch ({torch.__version__}) sees no CUDA GPU; "
                         "use cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


@dataclass
class GeneratedToken:
    id: int
    text: str  # new text this token completes (stop strings removed; may be empty)
    index: int = 0  # the choice it belongs to (SamplingParams.n)
    logprob: TokenLogprob | None = None  # when SamplingParams.logprobs asks for it


@dataclass
class Generation:
    """An iterator of generated tokens. When it ends, `state` holds the session after the prompt and
    every generated token, and `finish_reason` is "stop" or "length"."""

    atlas: Atlas
    state: SessionState
    params: SamplingParams
    prompt: list[int] = field(default_factory=list)  # its ids (the repetition penalty counts them)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None

    def __iter__(self) -> Iterator[GeneratedToken]:
        p = self.params
        sampler = Sampler(p, self.atlas.config.vocab_size, self.state.device, self.prompt)
        decoder = self.atlas.tokenizer.stream_decoder()
        stops = StopMatcher(p.stop)
        eos = set(self.atlas.eos_token_ids)
        logits = self.state.last_logits[0]
        for i in range(p.max_tokens):
            tok, logprob = sampler.sample(logits)
            self.token_ids.append(tok)
            end = tok in eos or i == p.max_tokens - 1  # an end-of-sequence token shows no text
            piece = stops.push(("" if tok in eos else decoder.push(tok)) + (decoder.flush() if end else ""))
            if end or stops.stopped:
                piece += stops.flush()
            self.text += piece
            yield GeneratedToken(tok, piece, logprob=logprob)
            self.state, out = self.atlas.feed(self.state, [tok])
            logits = out[0]
            if stops.stopped or tok in eos:
                self.finish_reason = "stop"
                return
        self.finish_reason = "length"


class Atlas:
    """A model on a device with its tokenizer and fingerprint."""

    def __init__(self, model: AtlasModel, tokenizer: Tokenizer | None = None, max_piece: int = 4096,
                 eos_token_ids: Sequence[int] = ()):
        self.model = model.eval()
        self.tokenizer = tokenizer or ByteTokenizer()
        self.eos_token_ids = tuple(eos_token_ids)  # generation stops at any of them (not shown)
        if self.tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError("tokenizer vocabulary is larger than the model's")
        self.fingerprint = fingerprint(model)
        self.max_piece = max_piece  # tokens per forward call; bounds activation memory
        # Set by `load`: the folder's sampling defaults (generation_config.json: temperature, top_p,
        # top_k, max_new_tokens where given) and the checkpoint read (tokenizer_config and all).
        self.generation_defaults: dict[str, Any] = {}
        self.checkpoint: Checkpoint | None = None
        self._layout = {k: (v.shape[1:], v.dtype) for k, v in self.new_state(1).tensors.items()
                        if not is_cache_key(k)}

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "auto",
             dtype: torch.dtype = torch.float32) -> Atlas:
        """A checkpoint directory (docs/formats.md, "Checkpoint folder"); None means the bundled
        demo model. A folder that cannot be served raises CheckpointError (its message names the
        file and the fix)."""
        if path is None:
            if not (BUNDLED_CHECKPOINT / "config.json").exists():
                log.warning("no bundled checkpoint found; using a randomly initialised default model")
                return cls.from_config(ModelConfig(), seed=0, device=device, dtype=dtype)
            path = BUNDLED_CHECKPOINT
        ckpt = read_checkpoint(path)
        model = load_checkpoint(ckpt, device=resolve_device(device), dtype=dtype)
        atlas = cls(model, ckpt.tokenizer, eos_token_ids=ckpt.eos_token_ids)
        atlas.generation_defaults, atlas.checkpoint = ckpt.generation_defaults, ckpt
        return atlas

    @classmethod
    def from_config(cls, cfg: ModelConfig, seed: int = 0, device: str | torch.device = "auto",
                    dtype: torch.dtype = torch.float32) -> Atlas:
        torch.manual_seed(seed)
        return cls(AtlasModel(cfg).to(device=resolve_device(device), dtype=dtype))

    @property
    def config(self) -> ModelConfig:
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- size (the one definition: start-up log, /v1/models, /metrics and bench/models.py) ---------

    @property
    def dtype(self) -> torch.dtype:
        """The weights' and activations' dtype (the recurrent state is at least fp32)."""
        return self.model.dtype

    @property
    def dtype_name(self) -> str:
        """`dtype` as ATLAS_DTYPE and `atlas serve --dtype` spell it: float32, bfloat16, float16."""
        return str(self.dtype).removeprefix("torch.")

    @functools.cached_property
    def parameters(self) -> int:
        """Parameters of the model (a tied embedding counted once)."""
        return sum(p.numel() for p in self.model.parameters())

    @functools.cached_property
    def weight_bytes(self) -> int:
        """Bytes of the weights in memory, in their dtype."""
        return sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))

    @functools.cached_property
    def state_bytes(self) -> int:
        """Bytes of one session's saved state (`save_state`): the same after any number of tokens."""
        return len(self.save_state(self.new_state()))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int], special: bool = False) -> str:
        """The text of `ids`; `special`: with special tokens' text (Tokenizer.decode)."""
        return self.tokenizer.decode(list(ids), special)

    # -- states ------------------------------------------------------------------------------------

    def new_state(self, batch: int = 1, position: int = 0) -> SessionState:
        """`batch` empty sessions; `position`: the token count they start at (>= 0)."""
        if batch < 1 or position < 0:
            raise ValueError(f"new_state: batch {batch} (>= 1), position {position} (>= 0)")
        tensors = self.model.init_state(batch, position)
        if self.tokenizer.holds_text:  # room for the text the incremental encoder holds back
            tensors.update(held_tensors(batch, self.device))
        return SessionState(tensors, self.fingerprint)

    def save_state(self, state: SessionState) -> bytes:
        return state.to_bytes()

    def load_state(self, data: bytes) -> SessionState:
        """Parse state bytes made by this model; refuses another model's states, states whose
        tensors do not have this model's layout and states holding values the model cannot step
        (non-finite or huge floats, token ids outside the vocabulary: `check_values`)."""
        state = SessionState.from_bytes(data, expected_fingerprint=self.fingerprint, device=self.device)
        tensors = {k: v for k, v in state.tensors.items() if not is_cache_key(k)}
        got = {k: (v.shape[1:], v.dtype) for k, v in tensors.items()}
        if got != self._layout or len({v.shape[0] for v in tensors.values()}) != 1:
            bad = sorted(k for k in self._layout.keys() | got.keys() if self._layout.get(k) != got.get(k))[:3]
            raise StateFormatError(f"state tensors do not match the model's state layout: {bad}")
        check_values(tensors, self.config.vocab_size, self.config.chunk_size)
        # Decode caches are not stored. They start empty (cache_len 0: valid on a chunk boundary,
        # rebuilt by the next feed otherwise), and the convolution history of an empty chunk is the
        # committed conv tail's queries.
        fresh = self.model.init_state(state.batch_size)
        caches = {k: v.to(self.device) for k, v in fresh.items() if is_cache_key(k)}
        for k in caches:
            if k.endswith(".cache_conv"):
                tail = tensors[k[:-len("cache_conv")] + "conv"]
                caches[k] = tail[..., :caches[k].shape[-1]].to(caches[k].dtype)
        return SessionState(dict(tensors, **caches), state.fingerprint)

    # -- running -----------------------------------------------------------------------------------

    @torch.no_grad()
    def feed(self, state: SessionState, tokens: Sequence[int] | Sequence[Sequence[int]] | Tensor,
             all_logits: bool = False) -> tuple[SessionState, Tensor]:
        """Read tokens into every session of `state` (the same count each). Returns the new state
        and the logits: (B, T, V) with all_logits, else those after the last token (B, V)."""
        if state.fingerprint != self.fingerprint:
            raise ValueError("state belongs to another model")
        toks = torch.as_tensor(tokens, device=self.device)
        if toks.numel() and (toks.is_floating_point() or toks.is_complex() or toks.dtype == torch.bool):
            raise TypeError(f"token ids are integers, not {toks.dtype}")
        toks = toks.to(torch.long)
        if toks.dim() == 1:
            toks = toks[None].expand(state.batch_size, -1)
        if toks.shape[0] != state.batch_size:
            raise ValueError(f"{toks.shape[0]} token rows for {state.batch_size} sessions")
        if int(toks.numel()) and (int(toks.min()) < 0 or int(toks.max()) >= self.config.vocab_size):
            raise ValueError("token id out of the vocabulary")
        tensors, outs = state.tensors, []
        for s in range(0, toks.shape[1], self.max_piece):
            logits, tensors = self.model(toks[:, s:s + self.max_piece], tensors, all_logits=all_logits)
            outs.append(logits)
        new = SessionState(carry_held(state.tensors, tensors), self.fingerprint)
        if all_logits:
            if not outs:
                return new, new.last_logits.new_zeros(toks.shape[0], 0, self.config.vocab_size)
            return new, torch.cat(outs, dim=1)
        return new, new.last_logits

    @torch.no_grad()
    def decode_step(self, state: SessionState, tokens: Sequence[int]) -> tuple[SessionState, Tensor]:
        """One token per session through the decode cache only (no chunk is committed, even for a
        session whose chunk this token completes: the caller commits it with `feed`). Big state
        tensors are shared with `state`, not copied. Falls back to `feed` when a cache is stale."""
        b = self.config.chunk_size
        t = state.tensors
        toks = torch.as_tensor(list(tokens), dtype=torch.long, device=self.device)[:, None]
        if not bool((t["cache_len"] == t["tokens"] % b).all()):
            return self.feed(state, toks)
        logits, new = self.model._decode(toks, t, t["tokens"] % b, all_logits=False)
        return SessionState(new, self.fingerprint), logits

    def default_params(self, **fields: Any) -> SamplingParams:
        """SamplingParams from the checkpoint's generation_config.json (`generation_defaults`:
        temperature, top_p, top_k, max_new_tokens as max_tokens), then `fields`."""
        given = {("max_tokens" if k == "max_new_tokens" else k): v
                 for k, v in self.generation_defaults.items()}
        return SamplingParams(**{**given, **fields})

    def generate(self, state: SessionState, prompt: str | Sequence[int] | None = None,
                 params: SamplingParams | None = None) -> Generation:
        """Feed the prompt into (a copy of) one session, then sample (`params` None: the checkpoint's
        defaults, `default_params()`). Iterate the result for tokens."""
        if state.batch_size != 1:
            raise ValueError("generate takes one session")
        params = params or self.default_params()
        if params.n != 1:
            raise ValueError("generate makes one choice: fork the state for more")
        state, ids = self.end_document(state)  # the document ends where the prompt starts
        prompt_ids = (self.encode(prompt) if isinstance(prompt, str) else list(prompt)) if prompt else []
        ids += prompt_ids
        if ids:
            state, _ = self.feed(state, ids)
        return Generation(self, state, params, prompt_ids)

    def prompt_logprobs(self, state: SessionState, tokens: Sequence[int], top: int = 0
                        ) -> tuple[SessionState, list[TokenLogprob | None]]:
        """Feed `tokens` into one session and give each its log-probability under the model (the
        log_softmax of the logits before it, as a generation would see them), with the `top` most
        likely tokens of its position. The first token has none (None) when the state has read
        nothing: no logits come before it."""
        if state.batch_size != 1:
            raise ValueError("prompt_logprobs takes one session")
        ids = list(tokens)
        if not ids:
            return state, []
        new, logits = self.feed(state, ids, all_logits=True)
        before = torch.cat([state.last_logits[:, None].to(logits.dtype), logits[:, :-1]], dim=1)[0]
        entries: list[TokenLogprob | None] = list(logprobs_of(before, ids, top))
        if int(state.tokens[0]) == 0:
            entries[0] = None
        return new, entries

    # -- chat (tokenizer_config.json) --------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The checkpoint's chat template (tokenizer_config.json's `chat_template`; of a list of
        named templates, the one named "default"), None without one."""
        cfg = self.checkpoint.tokenizer_config if self.checkpoint is not None else None
        template = (cfg or {}).get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template if isinstance(template, str) and template else None

    @property
    def special_tokens(self) -> dict[str, str]:
        """tokenizer_config.json's special tokens by name (bos_token, eos_token, ...), as text."""
        cfg = self.checkpoint.tokenizer_config if self.checkpoint is not None else None
        out: dict[str, str] = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                     "mask_token"):
            value = (cfg or {}).get(name)
            if isinstance(value, dict):  # an AddedToken written out: {"content": ..., ...}
                value = value.get("content")
            if isinstance(value, str):
                out[name] = value
        return out

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (a piece of a character has no text of its own)."""
        return self.tokenizer.token_bytes(token)

    # -- documents in pieces (docs/formats.md, "Held-back text") --------------------------------------

    def ingest(self, state: SessionState, data: bytes | str) -> SessionState:
        """Read a piece of a document into one session: the same tokens, and so the same state,
        however the document is cut into pieces (inside words and characters too). With a
        tokenizer.json, the text whose tokens may still change is held back in the state until the
        next piece, or until `end_document` (which `generate` calls)."""
        encoder = self.tokenizer.incremental_encoder(state.held())
        ids = encoder.push(data.encode("utf-8") if isinstance(data, str) else bytes(data))
        if ids:
            state, _ = self.feed(state, ids)
        return state.with_held(encoder.held) if state.holds_text else state

    def end_document(self, state: SessionState) -> tuple[SessionState, list[int]]:
        """A one-session state without held-back text, and the ids of that text (not yet fed)."""
        held = state.held()
        if not (held.context or held.text):
            return state, []
        return state.with_held(HeldText()), self.tokenizer.incremental_encoder(held).finish()
