"""An earlier commit of this repository, importable as `atlas` beside this tree: the anchor of the
before/after benchmarks (decode.py, memory_layer.py), which run it in processes of its own."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git(*argv: str) -> str:
    done = subprocess.run(["git", "-C", str(REPO), *argv], check=True, capture_output=True, text=True)
    return done.stdout.strip()


def describe_tree() -> str:
    """This working tree's commit, marked where tracked files have changed since."""
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return git("rev-parse", "HEAD") + (" + changes" if dirty else "")


@contextmanager
def earlier_tree(ref: str) -> Iterator[tuple[str, Path]]:
    """`ref` checked out in a temporary git worktree. Yields its full hash and a folder for
    PYTHONPATH whose `atlas` is that tree (the packages install as `atlas.*` from the top-level
    folders, pyproject.toml); the worktree is removed afterwards."""
    commit = git("rev-parse", ref)
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "src"
        git("worktree", "add", "--detach", str(tree), commit)
        importable = Path(tmp) / "path"
        importable.mkdir()
        (importable / "atlas").symlink_to(tree)
        try:
            yield commit, importable
        finally:
            git("worktree", "remove", "--force", str(tree))
