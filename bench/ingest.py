"""Ingestion benchmark: how fast the default model reads a document into a session, how fast it then
decodes, and that the session state stays the same size whatever the length.

Ingestion speed is what a long-context server lives on (a 1M-token document must be read once, then
only the constant-size state is kept), so this measures `Atlas.feed` on a document (--text, else
generated prose) at growing lengths with the default config (random weights: speed does not depend
on them, nor on the words).

    python bench/ingest.py                          # 1k, 4k, 16k, 64k tokens on the best device
    python bench/ingest.py --device cpu --lengths 1024,4096 --time-budget 300

Writes bench/results/ingest-<device>.json (machine, config, one row per length) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import resource
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    out = args.out or RESULTS / f"ingest-{result['machine']['device'].split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    Console().print(f"wrote {out}")


if __name__ == "__main__":
    main()
