"""Runtime throughput: aggregate decode and ingest tokens/s with N concurrent sessions, against the
same work run one session after another, and the step latency of the worker.

    python bench/runtime.py --sessions 1,8,32,128 --decode-tokens 32 --ingest-bytes 1024
    python bench/runtime.py --text book.txt      # each session reads its own part of that file

Without --text the sessions read generated prose (speed does not depend on the words).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from documents import document

from atlas.engine import Atlas, ModelConfig, SamplingParams
from atlas.engine.machine import describe_machine, portable_path
from atlas.engine.runtime import GenerationDone, Runtime, RuntimeSettings, percentile
from atlas.engine.store import StoreSettings, open_store

ROOT = Path(__file__).resolve().parents[1]


async def body(data: bytes, piece: int = 4096):
    for i in range(0, len(data), piece):
        yield data[i:i + piece]


async def ingest(rt: Runtime, sid: str, data: bytes) -> None:
    async for _ in rt.ingest(sid, "bench", body(data)):
        pass


async def decode(rt: Runtime, sid: str, n: int) -> int:
    got = 0
    params = SamplingParams(max_tokens=n, temperature=0)
    async for ev in rt.generate(sid, "bench", " ", params):
        got += 0 if isinstance(ev, GenerationDone) else 1
    return got


async def measure(rt: Runtime, n: int, docs: list[bytes], decode_tokens: int, concurrent: bool) -> dict:
    sids = [(await rt.create_session("bench")).id for _ in range(n)]

    async def run(jobs):
        if concurrent:
            return await asyncio.gather(*jobs)
        return [await j for j in jobs]

    rt.stats.step_seconds.clear()
    t = time.perf_counter()
    await run([ingest(rt, sid, d) for sid, d in zip(sids, docs, strict=True)])
    ingest_s = time.perf_counter() - t
    ingest_steps = list(rt.stats.step_seconds)
    rt.stats.step_seconds.clear()
    t = time.perf_counter()
    counts = await run([decode(rt, sid, decode_tokens) for sid in sids])
    decode_s = time.perf_counter() - t
    steps = list(rt.stats.step_seconds)
    for sid in sids:
        await rt.delete_session(sid, "bench")
    return {
        "ingest_tokens_per_s": sum(map(len, docs)) / ingest_s,
        "decode_tokens_per_s": sum(counts) / decode_s,
        "decode_step_p50_ms": 1e3 * percentile(steps, 50), "decode_step_p99_ms": 1e3 * percentile(steps, 99),
        "ingest_step_p50_ms": 1e3 * percentile(ingest_steps, 50),
        "ingest_step_p99_ms": 1e3 * percentile(ingest_steps, 99),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", default="1,8,32,128")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--ingest-bytes", type=int, default=1024)
    ap.add_argument("--text", type=Path, default=None, help="text file to read (default: generated prose)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    atlas = Atlas.from_config(ModelConfig(), seed=0, device=args.device)
    sessions = [int(x) for x in args.sessions.split(",")]
    text = document(max(sessions) * args.ingest_bytes, args.text)
    device = str(atlas.device)
    info = describe_machine(atlas.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(StoreSettings(data_dir=Path(tmp), cache_bytes=0))
        rt = Runtime(atlas, store, RuntimeSettings(max_batch=128, max_requests=1024), cache_bytes=4 << 30)
        try:
            for n in sessions:
                docs = [text[i * args.ingest_bytes:(i + 1) * args.ingest_bytes] for i in range(n)]
                seq = asyncio.run(measure(rt, n, docs, args.decode_tokens, concurrent=False))
                con = asyncio.run(measure(rt, n, docs, args.decode_tokens, concurrent=True))
                row = {"sessions": n, "sequential": seq, "concurrent": con,
                       "decode_speedup": con["decode_tokens_per_s"] / seq["decode_tokens_per_s"],
                       "ingest_speedup": con["ingest_tokens_per_s"] / seq["ingest_tokens_per_s"]}
                rows.append(row)
                print(f"{n:4d} sessions  decode {seq['decode_tokens_per_s']:8.1f} -> "
                      f"{con['decode_tokens_per_s']:8.1f} tok/s ({row['decode_speedup']:.2f}x)  "
                      f"ingest {seq['ingest_tokens_per_s']:8.1f} -> {con['ingest_tokens_per_s']:8.1f} tok/s "
                      f"({row['ingest_speedup']:.2f}x)  decode step p50/p99 "
                      f"{con['decode_step_p50_ms']:.1f}/{con['decode_step_p99_ms']:.1f} ms", flush=True)
        finally:
            rt.close()
            store.close()
    kind = "cuda" if device.startswith("cuda") else "cpu"
    out = args.out or ROOT / "bench" / "results" / f"runtime-{kind}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "runtime", "machine": info, "device": device,
                               "config": ModelConfig().model_dump(), "decode_tokens": args.decode_tokens,
                               "ingest_bytes": args.ingest_bytes,
                               "document": portable_path(args.text) if args.text else "generated",
                               "results": rows}, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
