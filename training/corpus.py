"""A corpus of real text that needs no download (`atlas corpus build`): prose and code from what the
machine already carries, split into training text and held-out evaluation text.

Sources, each read as UTF-8 (a file that does not decode, or holds a NUL byte, is skipped):

- ``texts``: every ``*.txt`` / ``*.md`` file of a folder of texts the user names (``--texts DIR``:
  books, notes; none by default);
- ``stdlib``: the ``.py`` files of Python's standard library (``sysconfig.get_paths()["stdlib"]``),
  but for ``site-packages`` and the ``test`` / ``tests`` folders (test data includes files in odd
  encodings written to break parsers);
- ``site-packages``: the installed packages' words (``sysconfig.get_paths()["purelib"]``): in every
  ``*.dist-info`` folder ``METADATA`` (the package's description) and the files whose name starts
  with LICENSE, LICENCE, COPYING, NOTICE or AUTHORS; elsewhere ``*.md`` and ``*.rst`` files, and
  ``*.txt`` files whose name contains license, licence, readme, copying or notice (other ``.txt``
  files in packages are mostly data: word lists, vocabularies, requirements).

Files of 256 bytes to 4 MB only. ``.py`` is code, the rest prose. A file longer than ``PIECE`` bytes is
cut at line breaks into pieces of about ``PIECE`` bytes (labels ``path#k``), so that one long text
lands in both splits. Pieces with the same text (after stripping) are kept once: the first label in
sorted order. A piece is held out when ``sha256("{seed}:{label}")`` read as a number is below 10% of
the range: the split depends only on the label and the seed, not on what else is installed.

Output in DIR: ``train-prose.txt``, ``train-code.txt``, ``eval-prose.txt``, ``eval-code.txt`` (pieces
joined by a blank line, in label order) and ``manifest.json`` (every piece's label, kind, split, bytes
and sha256; every file's bytes and sha256; the rule). Labels are relative to their root
(``stdlib/json/decoder.py``), never absolute paths of the machine."""

from __future__ import annotations

import hashlib
import json
import platform
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

PIECE = 32 * 1024
MIN_BYTES, MAX_BYTES = 256, 4 << 20
HELD_OUT = 0.10
_PKG_DOC_PREFIXES = ("license", "licence", "copying", "notice", "authors")
_PKG_TXT_WORDS = ("license", "licence", "readme", "copying", "notice")
SPLIT_RULE = (f"eval if int(sha256(f'{{seed}}:{{label}}').hexdigest(), 16) < {HELD_OUT} * 2**256, "
              f"else train; files over {PIECE} bytes cut at line breaks into ~{PIECE}-byte pieces "
              "labelled path#k; exact duplicates (stripped text) kept once, first label in sorted order")

@dataclass(frozen=True)
class Piece:
    label: str  # root/relative/path[#k]
    kind: str  # "prose" or "code"
    text: str


@dataclass(frozen=True)
class Root:
    name: str  # "texts", "stdlib", "site-packages"
    path: Path
    description: str  # what the root is, for the manifest (no absolute path)


def default_roots(texts: Path | None = None) -> list[Root]:
    """A folder of the user's texts (``texts``, if given), the standard library and the
    site-packages of the running interpreter."""
    paths = sysconfig.get_paths()
    roots = []
    if texts is not None:
        if not texts.is_dir():
            raise NotADirectoryError(f"--texts {texts}: not a folder")
        roots.append(Root("texts", texts, f"a folder of texts named {texts.name!r}"))
    roots.append(Root("stdlib", Path(paths["stdlib"]),
                      f"sysconfig stdlib of Python {platform.python_version()}"))
    roots.append(Root("site-packages", Path(paths["purelib"]),
                      "sysconfig purelib (site-packages) of the interpreter that built the corpus"))
    return roots


def _wanted(root: str, rel: Path) -> str | None:
    """The kind of the file `rel` of root `root` ("prose"/"code"), or None to leave it out."""
    name, suffix = rel.name.lower(), rel.suffix.lower()
    if root == "texts":
        return "prose" if suffix in (".txt", ".md") else None
    if root == "stdlib":
        skip = {"site-packages", "test", "tests"} & set(rel.parts[:-1])
        return "code" if suffix == ".py" and not skip else None
    if any(p.endswith(".dist-info") for p in rel.parts[:-1]):
        return "prose" if name == "metadata" or name.startswith(_PKG_DOC_PREFIXES) else None
    if suffix in (".md", ".rst") or (suffix == ".txt" and any(w in name for w in _PKG_TXT_WORDS)):
        return "prose"
    return None


def _read(path: Path) -> str | None:
    try:
        size = path.stat().st_size
        if not MIN_BYTES <= size <= MAX_BYTES:
            return None
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return None if "\0" in text else text


def _pieces(label: str, kind: str, text: str) -> Iterator[Piece]:
    """`text` whole, or cut at line breaks into pieces of about PIECE bytes."""
    if len(text.encode()) <= PIECE:
        yield Piece(label, kind, text)
        return
    lines, size, k = [], 0, 0
    for line in text.splitlines(keepends=True):
        lines.append(line)
        size += len(line.encode())
        if size >= PIECE:
            yield Piece(f"{label}#{k}", kind, "".join(lines))
            lines, size, k = [], 0, k + 1
    if lines:
        yield Piece(f"{label}#{k}", kind, "".join(lines))


def gather(roots: Iterable[Root]) -> tuple[list[Piece], int]:
    """Every wanted file of every root as pieces, sorted by label, duplicates dropped; and how many
    duplicates were dropped."""
    pieces: list[Piece] = []
    for root in roots:
        # sorted, and no following of links: the same tree gives the same list on every machine
        for path in sorted(p for p in root.path.rglob("*") if p.is_file() and not p.is_symlink()):
            rel = path.relative_to(root.path)
            kind = _wanted(root.name, rel)
            if kind and (text := _read(path)) is not None:
                pieces.extend(_pieces(f"{root.name}/{rel.as_posix()}", kind, text))
    pieces.sort(key=lambda p: p.label)
    seen: set[str] = set()
    kept = []
    for p in pieces:
        digest = hashlib.sha256(p.text.strip().encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            kept.append(p)
    return kept, len(pieces) - len(kept)


def split_of(label: str, seed: int = 0) -> str:
    """"eval" for about HELD_OUT of the labels, "train" for the rest; by a hash of the label alone."""
    h = int(hashlib.sha256(f"{seed}:{label}".encode()).hexdigest(), 16)
    return "eval" if h < HELD_OUT * 2 ** 256 else "train"


def build_corpus(out: Path, seed: int = 0, roots: Iterable[Root] | None = None) -> dict:
    """Write the four text files and manifest.json into `out`; returns the manifest."""
    roots = list(default_roots() if roots is None else roots)
    pieces, duplicates = gather(roots)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"{split}-{kind}.txt" for split in ("train", "eval") for kind in ("prose", "code")]
    groups: dict[str, list[Piece]] = {name: [] for name in names}
    entries = []
    for p in pieces:
        split = split_of(p.label, seed)
        groups[f"{split}-{p.kind}.txt"].append(p)
        data = p.text.encode()
        entries.append({"label": p.label, "kind": p.kind, "split": split, "bytes": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    files = {}
    for name, group in groups.items():
        data = "\n\n".join(p.text.strip("\n") for p in group).encode() + b"\n"
        (out / name).write_bytes(data)
        files[name] = {"pieces": len(group), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"seed": seed, "split_rule": SPLIT_RULE, "held_out": HELD_OUT,
                "roots": {r.name: r.description for r in roots}, "duplicates_dropped": duplicates,
                "files": files, "pieces": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def summary(manifest: dict) -> list[str]:
    """One line per output file, for the command line."""
    return [f"{name}: {f['pieces']} pieces, {f['bytes']:,} bytes" for name, f in manifest["files"].items()]

