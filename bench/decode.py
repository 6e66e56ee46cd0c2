"""Ingest and greedy decode of the default model (4.6M parameters, fresh weights of seed 0; `--vocab`
gives it another vocabulary, e.g. a subword tokenizer's 32,000) or of the bundled demo model
(`--model demo`): this working tree against an earlier commit, in one run.

Each measurement is its own process, the two source trees alternating (A B, B A, A B, ...), so that
the machine's load hits both alike; the earlier commit is checked out into a temporary git worktree
and imported in place of this one (PYTHONPATH). Per process: a 2,048-token prefix read into a fresh
session (timed after a 256-token warm-up: the ingest rate; `--readers N`: into N sessions at once,
as `atlas eval` reads its prompts; `--piece`: tokens per forward call, Atlas's 4,096 unless told,
`atlas eval`'s 65,536), then one session decoding 128 tokens
and 32 sessions decoding 64 steps together, one token per session per step
through `Atlas.feed` (the one-row fast path, and the block path for each token that completes a
chunk), with the thread policy of `atlas serve` (engine/threads.py). Reported: tokens/s of each, and
per pair the ratio working tree / earlier commit, as min, median and max.

    python bench/decode.py --ref HEAD~1            # the commit before the last
    python bench/decode.py --ref v0.3 --pairs 5
    python bench/decode.py --ref HEAD~1 --vocab 32000 --out bench/results/decode-vocab32k-cpu.json
    python bench/decode.py --ref HEAD~1 --model demo --out bench/results/decode-demo-cpu.json
    python bench/decode.py --ref HEAD~1 --model demo --prefix 65536 --readers 8 --piece 65536

Writes bench/results/decode-cpu.json (the commits by hash, the machine described).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def worker(model: str, prefix_len: int, single: int, sessions: int, steps: int,
           vocab: int | None, readers: int = 1, piece: int = 4096) -> dict[str, Any]:
    """Ingest and decode rates of the source tree this process imports (printed as JSON by --worker)."""
    import torch
    from ingest import decode_rate  # bench/ingest.py: the same greedy loop through Atlas.feed

    from atlas.engine import Atlas, ModelConfig, SessionState
    from atlas.engine.threads import apply_thread_policy

    if model == "demo":
        atlas = Atlas.load(device="cpu")
    else:
        config = ModelConfig() if vocab is None else ModelConfig(vocab_size=vocab)
        atlas = Atlas.from_config(config, seed=0, device="cpu")
    threads = apply_thread_policy(atlas.parameters)
    atlas.max_piece = piece
    prefix = [i * 7 % atlas.config.vocab_size for i in range(prefix_len)]

    atlas.feed(atlas.new_state(), prefix[:256])  # warm-up: allocator, lazy initialisation
    started = time.perf_counter()
    if readers == 1:
        atlas.feed(atlas.new_state(), prefix)
    else:
        atlas.feed(SessionState.stack([atlas.new_state()] * readers), torch.tensor([prefix] * readers))
    ingest = readers * prefix_len / (time.perf_counter() - started)
    decode_rate(atlas, prefix, 1, 16)
    return {"threads": threads.threads, "ingest_tok_s": round(ingest, 1),
            "decode_1_tok_s": round(decode_rate(atlas, prefix, 1, single), 1),
            "decode_many_tok_s": round(decode_rate(atlas, prefix, sessions, steps), 1)}


def run_worker(tree: Path | None, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in a fresh process importing `tree` (None: this working tree)."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--prefix", str(args.prefix),
           "--single", str(args.single), "--readers", str(args.readers),
           "--piece", str(args.piece),
           "--sessions", str(args.sessions), "--steps", str(args.steps)]
    if args.vocab is not None:
        cmd += ["--vocab", str(args.vocab)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", default="HEAD", help="the earlier commit to compare with")
    p.add_argument("--pairs", type=int, default=4, help="processes per tree")
    p.add_argument("--prefix", type=int, default=2048)
    p.add_argument("--model", choices=["default", "demo"], default="default")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the default model's)")
    p.add_argument("--readers", type=int, default=1, help="sessions reading the prefix together")
    p.add_argument("--piece", type=int, default=4096, help="tokens per forward call of the ingest")
    p.add_argument("--single", type=int, default=128, help="tokens one session decodes")
    p.add_argument("--sessions", type=int, default=32)
    p.add_argument("--steps", type=int, default=64, help="steps of the batched decode")
    p.add_argument("--out", type=Path, default=RESULTS / "decode-cpu.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.model == "demo" and args.vocab is not None:
        p.error("--vocab applies to the default model only")
    if args.worker:
        print(json.dumps(worker(args.model, args.prefix, args.single, args.sessions, args.steps, args.vocab,
                                args.readers, args.piece)))
        return 0

    from earlier_tree import describe_tree, earlier_tree
    from ingest import spread  # bench/ingest.py

    from atlas.engine.machine import describe_machine, load_average

    machine = describe_machine()
    with earlier_tree(args.ref) as (ref, importable):
        rows: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
        for i in range(args.pairs):
            for side in (("before", "after") if i % 2 == 0 else ("after", "before")):
                row = run_worker(importable if side == "before" else None, args)
                rows[side].append(row)
                print(f"{side:>6}: ingest {row['ingest_tok_s']:>8.1f} tok/s, "
                      f"1 session {row['decode_1_tok_s']:>7.1f} tok/s, "
                      f"{args.sessions} sessions {row['decode_many_tok_s']:>8.1f} tok/s", flush=True)
    machine["load_average_at_end"] = load_average()
    summary = {}
    for key in ("ingest_tok_s", "decode_1_tok_s", "decode_many_tok_s"):
        before = [r[key] for r in rows["before"]]
        after = [r[key] for r in rows["after"]]
        ratios = [a / b for a, b in zip(after, before, strict=True)]
        summary[key] = {"before_median": statistics.median(before), "after_median": statistics.median(after),
                        "ratio_after_over_before": spread(ratios)}
    report = {"benchmark": f"ingest and decode of the {args.model} model, this tree against an earlier "
                           "commit, interleaved",
              "machine": machine, "before": ref,
              "after": describe_tree(),
              "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("ATLAS_")},
              "settings": {k: getattr(args, k)
                           for k in ("model", "pairs", "prefix", "readers", "piece", "single", "sessions",
                                     "steps", "vocab")},
              "summary": summary, "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for key, s in summary.items():
        r = s["ratio_after_over_before"]
        print(f"{key}: before {s['before_median']:.1f}, after {s['after_median']:.1f} tok/s; after/before "
              f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
