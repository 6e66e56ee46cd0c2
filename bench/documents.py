"""Documents to read: a text file repeated or cut to size, or generated English-like prose when none
is given (reading speed does not depend on the words). The benchmarks and the tests share them."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
         "but have an they you were her she there been one all we their has would when if so no will "
         "memory state chunk token stream window read write recall").split()


def generated_text(n_chars: int, seed: int = 0) -> str:
    """At least ``n_chars`` of sentences drawn from WORDS, the same for the same seed."""
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < n_chars:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 16))).capitalize() + ". "
        parts.append(sentence)
        size += len(sentence)
    return "".join(parts)


def document(nbytes: int, path: Path | None = None, seed: int = 0) -> bytes:
    """Exactly ``nbytes``: the file at ``path`` (or 64 KiB of generated text) repeated, then cut."""
    base = path.read_bytes() if path is not None else generated_text(min(nbytes, 1 << 16), seed).encode()
    if not base:
        raise ValueError(f"{path} is empty")
    return (base * (nbytes // len(base) + 1))[:nbytes]
