"""Tokenizers. The default is byte-level (vocabulary 256, nothing to download): any UTF-8 text,
cut anywhere, round-trips. A checkpoint that ships a `tokenizer.json` gets that tokenizer instead,
through the `tokenizers` library.

Both encode a document that arrives in pieces with an incremental encoder (`incremental_encoder`):
bytes in, the token ids that are final out, the same ids however the document was cut. Byte-level,
every byte is final at once. With a `tokenizer.json`, the tail whose tokens may still change when
more text comes is held back (`HeldText`, at most `HOLD_BYTES` bytes) and travels in the session's
state between requests (docs/formats.md, "Held-back text"; the rule is in `HFIncrementalEncoder`).
"""

from __future__ import annotations

import codecs
import functools
import itertools
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

#: The most document bytes an incremental encoder holds back, and the most bytes of already-fed
#: context it keeps before them (docs/formats.md, "Held-back text").
HOLD_BYTES = 1024
#: The held text a commit looks at: what has surely arrived, whole characters, once more than
#: HOLD_BYTES are held (the last character may still be incomplete: up to 3 bytes).
WINDOW_BYTES = HOLD_BYTES - 4
CONTEXT_BYTES = 1024


@dataclass(frozen=True)
class HeldText:
    """What an incremental encoder carries from one request to the next.

    `text`: document bytes received but not yet turned into tokens (it may end inside a UTF-8
    character); they count in the session's `bytes_committed`. `context`: bytes right before them
    whose tokens are already fed, kept so that `text` is tokenized as it is in the whole document
    (and not as the start of one)."""

    context: bytes = b""
    text: bytes = b""


class IncrementalEncoder(Protocol):
    def push(self, data: bytes) -> list[int]:
        """More document bytes; the ids that no later byte can change."""
        ...

    def finish(self) -> list[int]:
        """The document ends here: the ids of everything held back (the encoder starts afresh)."""
        ...

    @property
    def held(self) -> HeldText: ...


class StreamDecoder(Protocol):
    def push(self, token: int) -> str:
        """Text completed by this token (may be empty while a character is still partial)."""
        ...

    def flush(self) -> str:
        """The text still held back (an unfinished character decodes as U+FFFD)."""
        ...


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], special: bool = False) -> str:
        """The text of `ids`; `special`: with the text of special (added) tokens, which generated
        text leaves out and prompts, echoes and /detokenize keep."""
        ...

    def stream_decoder(self, special: bool = False) -> StreamDecoder: ...

    def incremental_encoder(self, held: HeldText | None = None) -> IncrementalEncoder: ...

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (log-probability entries show them)."""
        ...

    @property
    def holds_text(self) -> bool:
        """Whether its incremental encoder ever holds text back (then states carry `HeldText`)."""
        ...


# -- bytes ------------------------------------------------------------------------------------------

class ByteTokenizer:
    vocab_size = 256
    holds_text = False

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], special: bool = False) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self, special: bool = False) -> _ByteStreamDecoder:
        return _ByteStreamDecoder()

    def token_bytes(self, token: int) -> bytes:
        return bytes([token])

    def incremental_encoder(self, held: HeldText | None = None) -> _ByteIncrementalEncoder:
        if held is not None and held.text:
            raise ValueError("the byte tokenizer holds no text back")
        return _ByteIncrementalEncoder()


class _ByteIncrementalEncoder:
    """Every byte is its token: nothing is ever held back."""

    held = HeldText()

    def push(self, data: bytes) -> list[int]:
        return list(data)

    def finish(self) -> list[int]:
        return []


class _ByteStreamDecoder:
    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._dec.decode(bytes([token]))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


# -- tokenizer.json ---------------------------------------------------------------------------------

class HFTokenizer:
    """A `tokenizer.json` read with the `tokenizers` library."""

    holds_text = True

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()
        self._rules: _Rules | None = None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], special: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=not special)

    def stream_decoder(self, special: bool = False) -> _HFStreamDecoder:
        return _HFStreamDecoder(self, special)

    def token_bytes(self, token: int) -> bytes:
        text = self._tok.decode([token], skip_special_tokens=False)
        if "\ufffd" not in text:
            return text.encode("utf-8")
        # A piece of a character: the byte the token names (byte fallback "<0x0A>", or GPT-2's
        # byte-level alphabet), else the replacement character's bytes as decoded.
        piece = self._tok.id_to_token(token) or ""
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        alphabet = _byte_alphabet()
        if piece and all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
        return text.encode("utf-8")

    def incremental_encoder(self, held: HeldText | None = None) -> HFIncrementalEncoder:
        if self._rules is None:
            self._rules = _Rules(self._tok)
        return HFIncrementalEncoder(self._rules, held or HeldText())


class _HFStreamDecoder:
    """Streaming detokenization with bounded re-decoding (the scheme of `tokenizers`' DecodeStream,
    which raises on invalid byte sequences and never flushes its tail). Each token decodes the few
    ids since the last emitted text together with the ids before it (the prefix, which gives the
    decoder its context: a word's leading space, a byte sequence's start); the new text is what
    goes past the prefix's text. Text ending in U+FFFD may be an unfinished character and waits,
    for at most `MAX_WAIT` tokens: past that it is invalid bytes, emitted as U+FFFD as `decode`
    would. So each token costs O(1) decoding, and the pieces join to `decode(ids)` (for text, always;
    a ByteFallback decoder shows a whole run of byte tokens as U+FFFD when one byte of it is
    invalid, which a bounded window cannot know)."""

    MAX_WAIT = 8

    def __init__(self, tok: HFTokenizer, special: bool = False):
        self._tok = tok._tok
        self._skip = not special
        self._ids: list[int] = []
        self._prefix = 0  # ids before this are emitted and no longer decoded
        self._read = 0  # ids before this are emitted

    def _step(self, force: bool) -> str:
        prefix = self._tok.decode(self._ids[self._prefix:self._read], skip_special_tokens=self._skip)
        text = self._tok.decode(self._ids[self._prefix:], skip_special_tokens=self._skip)
        grew = len(text) > len(prefix)
        waiting = not grew or text.endswith("\ufffd")
        if waiting and not force and len(self._ids) - self._read <= self.MAX_WAIT:
            return ""
        if not grew:  # tokens that show nothing (skipped special tokens): they join the prefix
            out = ""
            self._read = len(self._ids)
            self._prefix = max(self._prefix, self._read - 4 * self.MAX_WAIT)
        else:
            if text.startswith(prefix):
                out = text[len(prefix):]
            else:  # the decoder rewrote its context: emit what differs
                common = 0
                while common < len(prefix) and text[common] == prefix[common]:
                    common += 1
                out = text[common:]
            self._prefix, self._read = self._read, len(self._ids)
        if self._prefix > 64:  # keep the list short
            self._ids = self._ids[self._prefix:]
            self._read -= self._prefix
            self._prefix = 0
        return out

    def push(self, token: int) -> str:
        self._ids.append(token)
        return self._step(force=False)

    def flush(self) -> str:
        return self._step(force=True) if len(self._ids) > self._read else ""


@functools.cache
def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet (printable characters standing for bytes), character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def load_tokenizer(checkpoint_dir: Path | None) -> Tokenizer:
    if checkpoint_dir is not None and (Path(checkpoint_dir) / "tokenizer.json").exists():
        return HFTokenizer(Path(checkpoint_dir) / "tokenizer.json")
    return ByteTokenizer()


# -- the incremental encoder of a tokenizer.json ----------------------------------------------------

class _Rules:
    """What the incremental encoder needs to know about one tokenizer.json, worked out once."""

    def __init__(self, tok: Any) -> None:
        import json

        from tokenizers import Tokenizer as _Tok

        # A copy without the post-processor: with add_special_tokens=False it changes no id, only
        # offsets (ByteLevel trims the spaces off them), and the encoder needs untrimmed offsets.
        spec = json.loads(tok.to_str())
        self.tok = _Tok.from_str(json.dumps(dict(spec, post_processor=None)))
        model = spec.get("model") or {}
        added = [a for a in spec.get("added_tokens") or [] if a.get("content")]
        # Added tokens are matched in the text before anything else; text that may still become one
        # is held back (lstrip/rstrip ones also take the spaces beside them).
        self.added = [(a["content"], bool(a.get("lstrip")), bool(a.get("rstrip")),
                       bool(a.get("normalized"))) for a in added]
        self.added_max = max((len(a[0]) for a in self.added), default=0)
        # A BPE or Unigram model splits a word where no token of its vocabulary can span the cut,
        # whatever the rest of the word is. Such a cut inside a word is used when the pre-tokenizer
        # also starts the same words from there: none (Llama-style BPE with a byte fallback sees
        # the whole text as one word), Metaspace and WhitespaceSplit (which split at spaces only;
        # text without spaces, as Chinese or Japanese is, makes long words).
        kind = model.get("type")
        pre = (spec.get("pre_tokenizer") or {}).get("type")
        self.barriers = pre in (None, "Metaspace", "WhitespaceSplit") and (
            kind == "Unigram" or (kind == "BPE" and not model.get("continuing_subword_prefix")
                                  and not model.get("end_of_word_suffix") and not model.get("dropout")))
        self.bigrams: set[str] = set()
        self.opaque: set[str] = set()
        if self.barriers:
            added_set = {a[0] for a in self.added}
            vocab = model.get("vocab") or {}
            pieces = [p[0] for p in vocab] if isinstance(vocab, list) else list(vocab)
            for piece in pieces:
                if piece in added_set or _is_byte_token(piece):
                    self.opaque.add(piece)
                    continue
                for i in range(len(piece) - 1):
                    self.bigrams.add(piece[i:i + 2])
            if model.get("unk_token"):
                self.opaque.add(model["unk_token"])
            if isinstance(model.get("unk_id"), int) and 0 <= model["unk_id"] < len(pieces):  # Unigram
                self.opaque.add(pieces[model["unk_id"]])

    def barrier(self, left: str, right: str) -> bool:
        """No token of the vocabulary spans the boundary between these two tokens."""
        if left in self.opaque or right in self.opaque or not left or not right:
            return True
        return left[-1] + right[0] not in self.bigrams

    def added_start(self, text: str) -> int:
        """Where the text's tail could begin an added token (len(text) if nowhere): a prefix of one
        at the very end (or the whole of one, which a single_word or rstrip token may still refuse
        or extend), with the spaces before it for an lstrip token."""
        n = len(text)
        start = n
        if not self.added:
            return start
        tail = text[-self.added_max:]
        trimmed = text.rstrip()
        for content, lstrip, rstrip, normalized in self.added:
            forms = [(tail, content)]
            if normalized and len(tail.lower()) == len(tail):
                forms.append((tail.lower(), content.lower()))
            p = n
            for form, c in forms:
                for m in range(min(len(c), len(form)), 0, -1):
                    if form.endswith(c[:m]):
                        p = min(p, n - m)
                        break
            if rstrip and len(trimmed) < n and trimmed.endswith(content):
                p = min(p, len(trimmed) - len(content))
            if lstrip:
                while 0 < p < n and text[p - 1].isspace():
                    p -= 1
            start = min(start, p)
        return start


def _is_byte_token(piece: str) -> bool:
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def _clean_boundary(prev: str, cur: str) -> bool:
    """No normalizer can join the characters on the two sides: `cur` starts a new combining
    sequence and grapheme (it is no mark, no joiner, no Hangul vowel or final, and no second
    regional indicator), so NFC/NFKC, NFD with accent stripping, and grapheme-wise maps (the
    Precompiled one) treat the text before it alone."""
    if unicodedata.combining(cur) or unicodedata.category(cur) in ("Mn", "Mc", "Me"):
        return False
    o, p = ord(cur), ord(prev)
    if cur == "\u200d" or prev == "\u200d" or (prev == "\r" and cur == "\n"):
        return False
    if 0x1160 <= o <= 0x11FF or 0xD7B0 <= o <= 0xD7FF:  # Hangul vowels and finals
        return False
    if (0x1100 <= p <= 0x115F or 0xA960 <= p <= 0xA97F) and (0x1100 <= o <= 0x115F or 0xAC00 <= o <= 0xD7A3):
        return False  # a Hangul leading consonant before another or before a syllable
    if 0x1F1E6 <= o <= 0x1F1FF and 0x1F1E6 <= p <= 0x1F1FF:
        return False  # regional indicators pair up into flags
    return True


class HFIncrementalEncoder:
    """Tokens of a `tokenizer.json` for a document pushed in pieces, equal to
    `encode(document, add_special_tokens=False)` however the document is cut.

    The rule. The encoder keeps `context + held` (the context: already-fed text that starts where a
    pre-token of the document starts) and encodes it whole on every push. A position of the held
    text is a *cut* when it starts a pre-token (a word of the pre-tokenizer), or, for a tokenizer
    without pre-tokenizer, when no token of the vocabulary spans it (a BPE or Unigram model then
    splits there whatever follows); and when no normalizer can join across it (`_clean_boundary`).
    Everything before the second-to-last cut is final and fed: the last pre-token can still grow,
    and the one before it can still change when the next characters arrive (GPT-2's contractions:
    "'" then "'re"). Nothing that could still begin an added (special) token is fed. The held text
    starts at a cut; the context is the pre-token before it, so the pre-tokenizer starts at the same
    places as in the whole document, and the held text is not taken for a document start (no prefix
    space, no Metaspace or Prepend "▁" of its own).

    The bound: when the held text would exceed `HOLD_BYTES` (a pre-token that long: a base64 blob,
    a run of one character; for a tokenizer without pre-tokenizer, as long a span without a cut),
    the encoder cuts it anyway, as if the document ended there, half-way into its first
    WINDOW_BYTES. This is the one place where the tokens may differ from those of the whole
    document. Every commit looks at those first WINDOW_BYTES of the held text only, so the cuts
    are the same however the document arrives."""

    def __init__(self, rules: _Rules, held: HeldText) -> None:
        self._r = rules
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ctx = held.context.decode("utf-8", errors="replace")
        self._raw = b""  # the bytes of the held text as received (invalid bytes included)
        self._text = ""  # the held text, decoded (complete characters only)
        self.forced_cuts = 0  # times the bound cut the text (tests and logs look at it)
        self._add(held.text)

    @property
    def held(self) -> HeldText:
        return HeldText(self._ctx.encode("utf-8"), self._raw)

    def _add(self, data: bytes) -> None:
        self._raw += data
        self._text += self._dec.decode(data)

    def push(self, data: bytes) -> list[int]:
        if not data:
            return []
        self._add(data)
        return self._commit()

    def finish(self) -> list[int]:
        self._text += self._dec.decode(b"", final=True)
        ids = self._tokens(self._ctx + self._text, len(self._ctx))[0] if self._text else []
        self._ctx, self._text, self._raw = "", "", b""
        self._dec.reset()
        return ids

    def _tokens(self, w: str, n0: int) -> tuple[list[int], Any]:
        """The ids of w's tokens after its first n0 characters (the context), and the encoding."""
        enc = self._r.tok.encode(w, add_special_tokens=False)
        return [i for i, (s, _) in zip(enc.ids, enc.offsets, strict=True) if s >= n0], enc

    def _window(self) -> str:
        """The held text's first WINDOW_BYTES bytes (whole characters): all a commit looks at. With
        more than HOLD_BYTES received they have all arrived, so where the bound cuts depends on the
        document alone, not on how much of it came in one piece."""
        if 4 * len(self._text) <= WINDOW_BYTES:
            return self._text
        size = 0
        for i, ch in enumerate(self._text):
            size += len(ch.encode("utf-8"))
            if size > WINDOW_BYTES:
                return self._text[:i]
        return self._text

    def _commit(self) -> list[int]:
        """Window after window, what is final; the bound only where a whole window holds nothing
        final (and more than HOLD_BYTES are held): in one piece or many, the same cuts."""
        out: list[int] = []
        while True:
            held = len(self._raw)
            out += self._settle()
            if len(self._raw) < held:
                continue
            if held <= HOLD_BYTES:
                return out
            out += self._force()

    def _settle(self) -> list[int]:
        """Feed what is final in the window (the rule above)."""
        w, n0 = self._ctx + self._window(), len(self._ctx)
        if len(w) == n0:
            return []
        enc = self._r.tok.encode(w, add_special_tokens=False)
        ids, offs, words = enc.ids, enc.offsets, enc.word_ids
        toks = enc.tokens if self._r.barriers else []
        first = next((k for k, (s, _) in enumerate(offs) if s >= n0), len(ids))
        reach = list(itertools.accumulate((e for _, e in offs), max))  # text covered by tokens 0..k
        if first and reach[first - 1] > n0:  # a context token runs into the held text: give the
            self.forced_cuts += 1  # context up (a cut)
            self._ctx = ""
            return self._settle()
        # From the end: skip the last cut, take the one before it (where no added token may start),
        # then find where the pre-token (or span) before it starts, for the next context.
        limit = self._r.added_start(w)
        seen, q, kq, start = 0, 0, 0, n0
        for k in range(len(ids) - 1, first, -1):
            s = offs[k][0]
            if not (reach[k - 1] <= s and 0 < s < len(w)):
                continue  # inside a character's bytes, or a token spans it
            if words[k] != words[k - 1]:
                clean = _clean_boundary(w[s - 1], w[s])
                begins = True
            elif self._r.barriers and self._r.barrier(toks[k - 1], toks[k]):
                clean = begins = _clean_boundary(w[s - 1], w[s])
            else:
                continue
            if q:
                if begins:
                    start = s
                    break
            elif clean:
                seen += 1
                if seen >= 2 and s <= limit:
                    q, kq = s, k
        out: list[int] = []
        if q:
            out = ids[first:kq]
            self._keep(w, q, start)
        return out

    def _keep(self, w: str, q: int, start: int) -> None:
        """w[:q] is fed: the held text becomes w[q:], the context w[start:q] (the pre-token or span
        before q, its last CONTEXT_BYTES)."""
        n0 = len(self._ctx)
        ctx = w[start:q]
        data = ctx.encode("utf-8")
        if len(data) > CONTEXT_BYTES:
            ctx = data[-CONTEXT_BYTES:].decode("utf-8", errors="ignore")
        self._raw = self._raw[_raw_length(self._raw, w[n0:q]):]
        self._text = self._text[q - n0:]  # w may end at the window: the text beyond it stays held
        self._ctx = ctx

    def _force(self) -> list[int]:
        """The bound: cut the window HOLD_BYTES // 2 bytes in (at the first token end past that
        point, if one is clean), as if the document ended there."""
        self.forced_cuts += 1
        w, n0 = self._ctx + self._window(), len(self._ctx)
        q, size = n0, 0
        while q < len(w) - 1 and size + len(w[q].encode("utf-8")) <= HOLD_BYTES // 2:
            size += len(w[q].encode("utf-8"))
            q += 1
        offs = self._r.tok.encode(w, add_special_tokens=False).offsets
        ends = sorted(e for s, e in offs if s >= n0 and q <= e < len(w))
        clean = [e for e in ends if not any(s < e < t for s, t in offs)]
        if clean:
            q = clean[0]
        out = self._tokens(w[:q], n0)[0]
        self._keep(w, q, 0)
        return out


def _raw_length(raw: bytes, fed: str) -> int:
    """How many bytes at the start of `raw` decode to the characters `fed` (a prefix of its decoding)."""
    if "\ufffd" not in fed:
        return len(fed.encode("utf-8"))
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    chars = 0
    for i in range(len(raw)):
        chars += len(dec.decode(raw[i:i + 1]))
        if chars > len(fed) or (chars == len(fed) and dec.getstate()[0]):
            return i  # this byte emitted a replacement for the bytes before it, and starts the rest
        if chars == len(fed):
            return i + 1
    return len(raw)
