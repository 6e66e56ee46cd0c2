"""Ingestion benchmark: how fast the default model reads a document into a session, how fast it then
decodes, and that the session state stays the same size whatever the length.

Ingestion speed is what a long-context server lives on (a 1M-token document must be read once, then
only the constant-size state is kept), so this measures `Atlas.feed` on a document (--text, else
generated prose) at growing lengths with the default config (random weights: speed does not depend
on them, nor on the words).

    python bench/ingest.py                          # 1k, 4k, 16k, 64k tokens on the best device
    python bench/ingest.py --device cpu --lengths 1024,4096 --time-budget 300

Writes bench/results/ingest-<device>.json (machine, config, one row per length) and prints a table.

`--contended` measures what issue 27 is about, on the CPU: ingest tokens/s of the bundled demo model
and the default model on a quiet machine and beside a process that keeps one core busy (a CPU hog),
and decode tokens/s of the default model for 1 and 32 sessions, under two thread settings: torch's
default (one thread per core, OpenMP's default wait policy) and this project's policy
(`atlas.engine.threads`: threads by model size and usable cores, waiting threads asleep). Each setting
runs in its own child process (OpenMP reads its wait policy when torch loads), children alternate
(default, policy, default, policy, ...), and inside each, quiet and contended runs alternate too.
Ratios are contended / quiet per repetition (min, median).

    python bench/ingest.py --contended              # writes bench/results/ingest-contended-cpu.json
    python bench/ingest.py --contended --reps 3 --tokens 4096
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from documents import generated_text
from rich.console import Console
from rich.table import Table

from atlas.engine import Atlas, ModelConfig, SamplingParams, SessionState
from atlas.engine.api import resolve_device
from atlas.engine.machine import describe_machine, load_average, portable_path
from atlas.training.evaluation import parse_length

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
# What each --contended child sets: torch's default, or the policy (its OpenMP variables must be in
# the environment before torch is imported, so the parent sets them for the child).
THREAD_MODES = ("default", "policy")
OPENMP_VARS = ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--lengths", default="1024,4096,16384,65536",
                   help="comma-separated document lengths in tokens (k suffix allowed: 1k,4k)")
    p.add_argument("--decode-tokens", type=int, default=64, help="greedy tokens generated after each ingest")
    p.add_argument("--text", type=Path, default=None,
                   help="document to ingest (default: generated text)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds; skip a length whose predicted ingest time would overrun it (0: no limit)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: bench/results/ingest-<device>.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--contended", action="store_true",
                   help="quiet vs beside a CPU hog, torch default threading vs the thread policy (CPU)")
    p.add_argument("--reps", type=int, default=2, help="--contended: child processes per thread setting")
    p.add_argument("--tokens", type=int, default=2048, help="--contended: tokens per ingest")
    p.add_argument("--sessions", type=int, default=32, help="--contended: sessions of the batched decode")
    p.add_argument("--child", choices=list(THREAD_MODES), default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def parse_lengths(spec: str) -> list[int]:
    out = [parse_length(x) for x in spec.split(",") if x.strip()]
    if not out or min(out) <= 0:
        raise SystemExit("--lengths needs positive token counts")
    return sorted(set(out))


def document_tokens(atlas: Atlas, path: Path | None, n: int, seed: int) -> tuple[list[int], str]:
    """At least n tokens of the document (repeated if it is shorter), and where they came from."""
    if path is not None:
        ids, source = atlas.encode(path.read_text(encoding="utf-8")), portable_path(path)
    else:
        ids, source = atlas.encode(generated_text(n * 2, seed)), "generated"
    if not ids:
        raise SystemExit(f"{source} holds no tokens")
    while len(ids) < n:
        ids = ids + ids
    return ids[:n], source


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ingest(atlas: Atlas, tokens: list[int]) -> tuple[SessionState, float]:
    device = atlas.device
    ids = torch.tensor(tokens, dtype=torch.long, device=device)
    state = atlas.new_state()
    sync(device)
    t0 = time.perf_counter()
    state, _ = atlas.feed(state, ids)
    sync(device)
    return state, time.perf_counter() - t0


def timed_decode(atlas: Atlas, state: SessionState, n: int) -> float:
    """Seconds to generate n greedy tokens (each token is sampled, then fed back)."""
    gen = atlas.generate(state, None, SamplingParams(max_tokens=n, temperature=0.0))
    sync(atlas.device)
    t0 = time.perf_counter()
    count = sum(1 for _ in gen)
    sync(atlas.device)
    dt = time.perf_counter() - t0
    assert count == n and gen.finish_reason == "length"
    return dt


def run(args: argparse.Namespace) -> dict[str, Any]:
    console = Console()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    lengths = parse_lengths(args.lengths)
    cfg = ModelConfig()
    atlas = Atlas.from_config(cfg, seed=args.seed, device=device)
    tokens, source = document_tokens(atlas, args.text, max(lengths), args.seed)
    info = describe_machine(device)
    console.print(f"[bold]ingest benchmark[/] on {info['cpu_model']} ({info['torch_threads']} threads), "
                  f"device {device}, document {source}")

    started = time.perf_counter()
    # Warm-up: one ingest and a short decode (allocator, kernels, lazy init).
    warm_state, warm_s = timed_ingest(atlas, tokens[:min(1024, lengths[0])])
    timed_decode(atlas, warm_state, min(8, args.decode_tokens))
    console.print(f"warm-up: {min(1024, lengths[0])} tokens in {warm_s:.2f}s")
    rate = min(1024, lengths[0]) / warm_s

    rows: list[dict[str, Any]] = []
    skipped: list[int] = []
    for n in lengths:
        elapsed = time.perf_counter() - started
        if args.time_budget and elapsed + n / rate * 1.2 > args.time_budget:
            console.print(f"[yellow]skip {n} tokens: predicted {n / rate:.0f}s overruns the time budget[/]")
            skipped.append(n)
            continue
        state, ingest_s = timed_ingest(atlas, tokens[:n])
        rate = n / ingest_s
        decode_s = timed_decode(atlas, state, args.decode_tokens) if args.decode_tokens else float("nan")
        data = atlas.save_state(state)
        assert state.tokens == [n]
        row = {
            "tokens": n,
            "ingest_s": round(ingest_s, 4),
            "ingest_tok_s": round(n / ingest_s, 1),
            "decode_tokens": args.decode_tokens,
            "decode_s": round(decode_s, 4),
            "decode_tok_s": round(args.decode_tokens / decode_s, 2) if args.decode_tokens else None,
            "state_bytes": len(data),
            "state_tensor_bytes": state.nbytes,
        }
        rows.append(row)
        console.print(f"  {n:>7} tokens: ingest {row['ingest_tok_s']:>9.1f} tok/s, "
                      f"decode {row['decode_tok_s']} tok/s, state {len(data):,} B")

    sizes = {r["state_bytes"] for r in rows}
    result = {
        "benchmark": "ingest",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {**info, "load_average_at_end": load_average(),
                    "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
        "config": cfg.model_dump(mode="json"),
        "parameters": sum(p.numel() for p in atlas.model.parameters()),
        "document": source,
        "warmup": {"tokens": min(1024, lengths[0]), "ingest_s": round(warm_s, 4)},
        "results": rows,
        "skipped_lengths": skipped,
        "state_bytes_constant": len(sizes) == 1,
        "total_s": round(time.perf_counter() - started, 1),
    }
    show(console, result)
    return result


def show(console: Console, result: dict[str, Any]) -> None:
    m = result["machine"]
    table = Table(title=f"ATLAS ingestion, default config ({result['parameters'] / 1e6:.1f}M params), "
                        f"{m['device']}, {m['torch_threads']} threads")
    for col in ("tokens", "ingest s", "ingest tok/s", "decode tok/s", "state bytes"):
        table.add_column(col, justify="right")
    for r in result["results"]:
        table.add_row(f"{r['tokens']:,}", f"{r['ingest_s']:.2f}", f"{r['ingest_tok_s']:,.1f}",
                      f"{r['decode_tok_s']}", f"{r['state_bytes']:,}")
    console.print(table)
    verdict = "[green]constant[/]" if result["state_bytes_constant"] else "[red]NOT constant[/]"
    console.print(f"state size: {verdict}; total {result['total_s']}s")


# -- --contended -----------------------------------------------------------------------------------


def start_hog() -> subprocess.Popen[bytes]:
    """A process that keeps one core busy, as another tenant's job would."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)  # running before the measurement starts
    return hog


def stop_hog(hog: subprocess.Popen[bytes]) -> None:
    hog.kill()
    hog.wait()


def decode_rate(atlas: Atlas, prefix: list[int], sessions: int, steps: int) -> float:
    """Greedy decode tokens/s of `sessions` sessions stacked, one token each per step through
    `Atlas.feed` (the one-row fast path, and the block path for the token that completes a chunk)."""
    state, logits = atlas.feed(SessionState.stack([atlas.new_state()] * sessions), [prefix] * sessions)
    nxt = logits.argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, logits = atlas.feed(state, nxt[:, None])
        nxt = logits.argmax(-1)
    return sessions * steps / (time.perf_counter() - t0)


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One thread setting: per model, quiet and contended ingests alternating; then decode."""
    from atlas.engine.threads import apply_thread_policy

    torch.manual_seed(args.seed)
    models = {"demo": Atlas.load(device="cpu"),
              "default": Atlas.from_config(ModelConfig(), seed=0, device="cpu")}
    out: dict[str, Any] = {"mode": args.child, "models": {}}
    for name, atlas in models.items():
        threads = (apply_thread_policy(atlas.parameters).threads if args.child == "policy"
                   else torch.get_num_threads())
        tokens, _ = document_tokens(atlas, None, args.tokens, args.seed)
        timed_ingest(atlas, tokens[:512])  # warm-up
        quiet, contended = [], []
        for _ in range(2):
            quiet.append(len(tokens) / timed_ingest(atlas, tokens)[1])
            hog = start_hog()
            try:
                contended.append(len(tokens) / timed_ingest(atlas, tokens)[1])
            finally:
                stop_hog(hog)
        row: dict[str, Any] = {"parameters": atlas.parameters, "threads": threads, "quiet_tok_s": quiet,
                               "contended_tok_s": contended}
        if name == "default":
            prefix = tokens[:100]  # mid-chunk, so decoding crosses a chunk boundary
            decode_rate(atlas, prefix, 1, 8)
            row["decode_1_tok_s"] = decode_rate(atlas, prefix, 1, 128)
            row["decode_many_tok_s"] = decode_rate(atlas, prefix, args.sessions, 64)
            row["decode_sessions"] = args.sessions
        out["models"][name] = row
    return out


def run_child(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_VARS and not k.startswith("ATLAS_")}
    if mode == "policy":
        from atlas.engine.threads import OPENMP_ENV
        env.update(OPENMP_ENV)
    cmd = [sys.executable, __file__, "--child", mode, "--tokens", str(args.tokens), "--sessions",
           str(args.sessions), "--seed", str(args.seed)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"child {mode} failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def spread(xs: list[float]) -> dict[str, float]:
    return {"min": round(min(xs), 3), "median": round(statistics.median(xs), 3), "max": round(max(xs), 3)}


def contended(args: argparse.Namespace) -> dict[str, Any]:
    console = Console(width=160)
    info = describe_machine("cpu")
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in THREAD_MODES}
    for rep in range(args.reps):
        for mode in THREAD_MODES:
            runs[mode].append(run_child(mode, args))
            console.print(f"rep {rep + 1}/{args.reps} {mode}: done")
    summary: dict[str, Any] = {}
    table = Table(title=f"ingest of {args.tokens} tokens, quiet vs beside a CPU hog "
                        f"({info['cpu_cores_usable']} usable cores)")
    for col in ("model", "threads", "setting", "quiet tok/s", "contended tok/s", "contended/quiet",
                "decode 1 tok/s", f"decode {args.sessions} tok/s"):
        table.add_column(col, justify="right")
    for name in ("demo", "default"):
        for mode in THREAD_MODES:
            rows = [r["models"][name] for r in runs[mode]]
            quiet = [q for r in rows for q in r["quiet_tok_s"]]
            cont = [c for r in rows for c in r["contended_tok_s"]]
            ratios = [c / q for r in rows
                      for q, c in zip(r["quiet_tok_s"], r["contended_tok_s"], strict=True)]
            s: dict[str, Any] = {"threads": rows[0]["threads"], "parameters": rows[0]["parameters"],
                                 "quiet_tok_s": spread(quiet), "contended_tok_s": spread(cont),
                                 "contended_over_quiet": spread(ratios)}
            if "decode_1_tok_s" in rows[0]:
                s["decode_1_tok_s"] = spread([r["decode_1_tok_s"] for r in rows])
                s["decode_many_tok_s"] = spread([r["decode_many_tok_s"] for r in rows])
            summary[f"{name}/{mode}"] = s
            table.add_row(name, str(s["threads"]), mode, f"{s['quiet_tok_s']['median']:,.0f}",
                          f"{s['contended_tok_s']['median']:,.0f}",
                          f"{s['contended_over_quiet']['median']:.2f} "
                          f"({s['contended_over_quiet']['min']:.2f}-{s['contended_over_quiet']['max']:.2f})",
                          f"{s['decode_1_tok_s']['median']:,.0f}" if "decode_1_tok_s" in s else "",
                          f"{s['decode_many_tok_s']['median']:,.0f}" if "decode_many_tok_s" in s else "")
    console.print(table)
    return {
        "benchmark": "ingest_contended",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {**info, "load_average_at_end": load_average()},
        "tokens": args.tokens,
        "reps": args.reps,
        "hog": "one Python busy loop (one core)",
        "summary": summary,
        "runs": runs,
        "total_s": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.contended:
        out = args.out or RESULTS / "ingest-contended-cpu.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(contended(args), indent=2) + "\n")
        Console().print(f"wrote {portable_path(out)}")
        return
    result = run(args)
    out = args.out or RESULTS / f"ingest-{result['machine']['device'].split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    Console().print(f"wrote {out}")


if __name__ == "__main__":
    main()
