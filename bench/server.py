"""Server benchmark: N concurrent streaming clients over loopback HTTP, as users see the server.

Each client sends OpenAI-style streaming completions (``/v1/completions``, ``stream: true``) on a fork
of one document session (the product's use: a document read once, then many questions), and
records the time to first token (TTFT), the gaps between tokens (inter-token latency, ITL), its
tokens and its errors. The runtime batches the clients' decode steps, so tokens/s should grow with N
while ITL grows less than N.

    python bench/server.py                           # starts `atlas serve` (default model), N = 1, 16, 64
    python bench/server.py --clients 1,8 --max-tokens 16
    python bench/server.py --url http://host:8000 --api-key KEY --device cuda
    python bench/server.py --text book.txt           # that document instead of generated prose

Writes bench/results/server-<device>.json (machine, settings, one row per N) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from documents import document
from rich.console import Console
from rich.table import Table
from server_process import ServerProcess

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,16,64", help="comma-separated concurrency levels")
    p.add_argument("--requests", type=int, default=4, help="requests per client at each level")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per completion")
    p.add_argument("--prompt", default="\nROMEO:", help="prompt after the document")
    p.add_argument("--doc-bytes", type=int, default=2048, help="document ingested into the session first")
    p.add_argument("--text", type=Path, default=None,
                   help="text file the document is cut from (default: generated prose)")
    p.add_argument("--url", default=None, help="benchmark this server instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("ATLAS_BENCH_API_KEY"), help="Bearer key for --url")
    p.add_argument("--model", default=None, help="checkpoint directory for the started server (ATLAS_MODEL)")
    p.add_argument("--device", default="auto", help="device of the started server (auto, cpu, cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the started server")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: bench/results/server-<device>.json)")
    return p.parse_args(argv)


# -- the machine ----------------------------------------------------------------------------------------

def machine(device: str) -> dict[str, Any]:
    """What ran the clients (and, when started here, the server); `device` may name a remote one."""
    import torch  # not at the top: --help needs no torch

    from atlas.engine.machine import describe_machine

    local = device if device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    info = describe_machine(local)
    del info["torch_threads"]  # this process's threads, not the server's (those are in settings)
    return {**info, "device": device, "note": "clients and server share this machine (loopback)"}


# -- clients --------------------------------------------------------------------------------------------

async def one_completion(http: httpx.AsyncClient, body: dict) -> dict[str, Any]:
    """One streaming completion: TTFT, inter-token gaps, tokens, or the error."""
    t0 = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"{r.status_code} {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    return {"error": ev["error"].get("code", "error")}
                if ev.get("usage"):
                    tokens = ev["usage"]["completion_tokens"]
                if ev.get("choices") and ev["choices"][0]["text"]:
                    now = time.perf_counter()
                    if first is None:
                        first = now - t0
                    else:
                        gaps.append(now - last)
                    last = now
    except httpx.HTTPError as e:
        return {"error": type(e).__name__}
    return {"ttft": first, "gaps": gaps, "tokens": tokens, "seconds": time.perf_counter() - t0}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


async def level(http: httpx.AsyncClient, n: int, args: argparse.Namespace, base: dict) -> dict[str, Any]:
    async def client(i: int) -> list[dict]:
        out = []
        for j in range(args.requests):
            out.append(await one_completion(http, {**base, "seed": i * 1000 + j}))
        return out

    t0 = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(client(i) for i in range(n))) for r in rs]
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in ok)
    ms = lambda v: None if v is None else round(v * 1000, 2)
    return {
        "clients": n, "requests": len(results), "errors": len(results) - len(ok),
        "error_kinds": sorted({r["error"] for r in results if "error" in r}),
        "ttft_p50_ms": ms(pct(ttft, 50)), "ttft_p99_ms": ms(pct(ttft, 99)),
        "itl_p50_ms": ms(pct(gaps, 50)), "itl_p99_ms": ms(pct(gaps, 99)),
        "tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
        "tokens_per_s_per_client": round(tokens / wall / n, 2),
    }


async def bench(url: str, args: argparse.Namespace, levels: list[int], console: Console) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(levels) + 8, max_keepalive_connections=max(levels) + 8)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as http:
        model = (await http.get("/v1/models")).raise_for_status().json()["data"][0]
        sid = (await http.post("/v1/sessions")).raise_for_status().json()["id"]
        doc = document(args.doc_bytes, args.text)
        t0 = time.perf_counter()
        r = await http.post(f"/v1/sessions/{sid}/ingest", content=doc, headers={"Content-Type": "text/plain"})
        r.raise_for_status()
        console.print(f"session {sid[:8]}: {len(doc)} bytes ingested in {time.perf_counter() - t0:.1f}s")
        base = {"model": model["id"], "prompt": args.prompt, "max_tokens": args.max_tokens,
                "temperature": 0.8, "stream": True, "stream_options": {"include_usage": True},
                "session_id": sid}
        await one_completion(http, {**base, "max_tokens": 4})  # warm-up
        rows = []
        for n in levels:
            row = await level(http, n, args, base)
            console.print(f"N={n}: {row['tokens_per_s']} tok/s, TTFT p50 {row['ttft_p50_ms']} ms, "
                          f"ITL p50 {row['itl_p50_ms']} ms, errors {row['errors']}")
            rows.append(row)
        metrics = (await http.get("/metrics")).text
        await http.delete(f"/v1/sessions/{sid}")
    return {"model": model, "doc_bytes": len(doc), "results": rows,
            "server_metrics": {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                               if line.startswith(("atlas:num_requests", "atlas:generation_tokens_total",
                                                   "atlas:engine_steps_total", "atlas:state_bytes"))}}


def bench_started_server(args: argparse.Namespace, levels: list[int], console: Console) -> dict[str, Any]:
    """The benchmark against an `atlas serve` started here, on a throw-away data directory."""
    settings = {"ATLAS_DEVICE": args.device, "ATLAS_MAX_TOKENS": str(max(4096, args.max_tokens)),
                "ATLAS_LOG_LEVEL": "warning"}
    if args.model:
        settings["ATLAS_MODEL"] = str(args.model)
    with tempfile.TemporaryDirectory(prefix="atlas-bench-") as tmp:
        server = ServerProcess(Path(tmp), settings, threads=args.threads)
        try:
            server.start(timeout_s=300)
            return asyncio.run(bench(server.url, args, levels, console))
        finally:
            server.stop(timeout_s=60)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from atlas.engine.machine import load_average, portable_path  # after --help: it imports torch

    console = Console()
    levels = sorted({int(x) for x in args.clients.split(",") if x.strip()})
    if not levels or min(levels) < 1:
        raise SystemExit("--clients needs positive integers")
    device = args.device if args.device != "auto" else ("unknown" if args.url else None)
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    info = machine(device)
    if args.url is None:
        out = bench_started_server(args, levels, console)
    else:
        out = asyncio.run(bench(args.url, args, levels, console))
    result = {"benchmark": "server", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info,
              "settings": {"max_tokens": args.max_tokens, "requests_per_client": args.requests,
                           "prompt": args.prompt, "endpoint": "/v1/completions (stream, session fork)",
                           "server": args.url or "atlas serve (started by the benchmark)",
                           "threads": args.threads,
                           "document": portable_path(args.text) if args.text else "generated"},
              **out}
    result["machine"]["load_average_at_end"] = load_average()
    path = args.out or RESULTS / f"server-{device}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f"server benchmark: {out['model']['id']} on {device}, "
                        f"{args.max_tokens} tokens/request")
    for col in ("clients", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "errors"):
        table.add_column(col, justify="right")
    for r in out["results"]:
        table.add_row(str(r["clients"]), str(r["tokens_per_s"]), str(r["ttft_p50_ms"]), str(r["ttft_p99_ms"]),
                      str(r["itl_p50_ms"]), str(r["itl_p99_ms"]), str(r["errors"]))
    console.print(table)
    console.print(f"written to {path}")
    return result


if __name__ == "__main__":
    main()
