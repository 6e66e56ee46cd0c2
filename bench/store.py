"""Benchmark the state store against raw redis-py SET/GET of the same bytes.

For each state size, every repetition does, interleaved so that machine noise hits both alike:
raw ``SET`` + ``GET`` of one value and the store's ``put`` (parts + checksums + atomic commit)
and verified ``get``, in turn first (A B, B A, ...). Reported: median MB/s of each, and the
store/raw ratio of each repetition: median, quartiles, and best-of. Raw operations use the
store's own redis-py client (same connection settings), so the ratio is the cost of the store's
protocol, not of client tuning.

    python bench/store.py                      # Redis at 127.0.0.1:6379, 4/64/512 MB
    python bench/store.py --url redis://host:6380/0 --sizes 4,64 --reps 5

Keys live under a random prefix and are deleted at the end. Results: bench/results/store.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import redis

from atlas.engine.machine import describe_machine, load_average
from atlas.engine.store import RedisStore, StoreSettings
from atlas.engine.store.redis_store import connect

MB = 1 << 20


def _has_hiredis() -> bool:
    try:
        import hiredis  # noqa: F401
    except ImportError:
        return False
    return True


def timed(fn: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def bench_size(store: RedisStore, raw: redis.Redis, size: int, reps: int, prefix: str) -> dict[str, Any]:
    data = os.urandom(size)
    raw_key = f"{prefix}:raw"
    t: dict[str, list[float]] = {"raw_set": [], "raw_get": [], "save": [], "load": []}

    def raw_pair() -> None:
        dt, _ = timed(lambda: raw.set(raw_key, data))
        t["raw_set"].append(dt)
        dt, got = timed(lambda: raw.get(raw_key))
        t["raw_get"].append(dt)
        assert got == data
        raw.delete(raw_key)

    def store_pair() -> None:
        sid = store.create("bench").id
        dt, _ = timed(lambda: store.put(sid, data, fingerprint="bench"))
        t["save"].append(dt)
        dt, (got, _meta) = timed(lambda: store.get(sid, expected_fingerprint="bench"))
        t["load"].append(dt)
        assert got == data
        store.delete(sid)

    store_pair(), raw_pair()  # warm-up: connections, Lua scripts, Redis' allocator
    for k in t.values():
        k.clear()
    for i in range(reps):  # A B, B A, ...: what comes first (a freshly freed value, a warm cache) alternates
        for step in ((raw_pair, store_pair) if i % 2 == 0 else (store_pair, raw_pair)):
            step()
    med = {k: statistics.median(v) for k, v in t.items()}
    mbps = {k: size / MB / v for k, v in med.items()}
    # per repetition: the store's speed over raw's in the same moment, so load that comes and goes
    # on a shared machine hits both sides of each ratio
    save_r = sorted(a / b for a, b in zip(t["raw_set"], t["save"], strict=True))
    load_r = sorted(a / b for a, b in zip(t["raw_get"], t["load"], strict=True))
    return {
        "size_mb": size // MB, "checksum": store.settings.state_checksum,
        "part_bytes": store.settings.part_bytes, "reps": reps,
        "store_save_MBps": round(mbps["save"], 1), "store_load_MBps": round(mbps["load"], 1),
        "raw_set_MBps": round(mbps["raw_set"], 1), "raw_get_MBps": round(mbps["raw_get"], 1),
        "save_ratio": round(statistics.median(save_r), 3),
        "load_ratio": round(statistics.median(load_r), 3),
        "save_ratio_quartiles": [round(q, 3) for q in _quartiles(save_r)],
        "load_ratio_quartiles": [round(q, 3) for q in _quartiles(load_r)],
        # best-of ratios: less sensitive to other load on a shared machine
        "save_ratio_best": round(min(t["raw_set"]) / min(t["save"]), 3),
        "load_ratio_best": round(min(t["raw_get"]) / min(t["load"]), 3),
        "seconds": {k: [round(x, 5) for x in v] for k, v in t.items()},
    }


def _quartiles(xs: list[float]) -> list[float]:
    return statistics.quantiles(xs, n=4) if len(xs) > 1 else xs * 3


def cleanup(raw: redis.Redis, prefix: str) -> int:
    n = 0
    for key in raw.scan_iter(f"{prefix}:*", count=1000):
        n += raw.unlink(key)
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="redis://127.0.0.1:6379/0", help="Redis to measure against")
    p.add_argument("--sizes", default="4,64,512", help="state sizes in MB, comma separated")
    p.add_argument("--reps", type=int, default=0, help="repetitions per size (0: 15/7/3 by size)")
    p.add_argument("--part-bytes", type=int, default=StoreSettings.model_fields["part_bytes"].default)
    p.add_argument("--checksums", default="xxh3,crc32,sha256", help="checksum settings to measure")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "store.json")
    args = p.parse_args(argv)

    prefix = f"atlas-bench-{uuid.uuid4().hex[:8]}"
    client = connect(args.url, timeout_s=120)
    info = client.info("server")
    conf = {k: v for k, v in client.config_get("*").items()
            if k in ("appendonly", "appendfsync", "save", "maxmemory", "io-threads", "proto-max-bulk-len")}
    results: list[dict[str, Any]] = []
    desc = {**describe_machine(), "redis_py": redis.__version__, "hiredis": _has_hiredis()}
    try:
        for checksum in args.checksums.split(","):
            settings = StoreSettings(redis_url=args.url, key_prefix=prefix, part_bytes=args.part_bytes,
                                     state_checksum=checksum)  # type: ignore[arg-type]
            store = RedisStore(client, settings)
            for size_mb in (int(s) for s in args.sizes.split(",")):
                reps = args.reps or (15 if size_mb <= 8 else 7 if size_mb <= 128 else 3)
                r = bench_size(store, client, size_mb * MB, reps, prefix)
                results.append(r)
                print(f"{checksum:>6} {size_mb:>4} MB  save {r['store_save_MBps']:>7.0f} MB/s "
                      f"(raw SET {r['raw_set_MBps']:>6.0f}, {r['save_ratio']:.2f}x)   "
                      f"load {r['store_load_MBps']:>7.0f} MB/s (raw GET {r['raw_get_MBps']:>6.0f}, "
                      f"{r['load_ratio']:.2f}x); save ratio quartiles {r['save_ratio_quartiles']}",
                      flush=True)
    finally:
        left = cleanup(client, prefix)
        client.close()
    desc["load_average_at_end"] = load_average()
    notes = [
        "store save = checksum every part + pipelined SETs + one commit script; raw = one SET. "
        "Checksums run in worker threads, so they are free only where a core is idle: with the "
        "client, redis-server and the hashing sharing few cores, sha256 (~1.5 GB/s/core) costs "
        "about as much CPU as the SET itself and caps small-state save ratios.",
        "store load = metadata read + pipelined GETs of parts + checksum verification; it beats "
        "one raw GET on large states because redis-py's pure-Python parser handles several "
        "mid-sized replies faster than one huge reply (hiredis would speed both up).",
    ]
    loads = [a[0] for a in (desc["load_average_at_start"], desc["load_average_at_end"]) if a]
    if loads and max(loads) > 0.5 * (os.cpu_count() or 1):
        notes.append("the machine was busy with other processes during the run (see load_average_at_*): "
                     "medians are noisy; compare the *_best ratios too.")
    report = {
        "benchmark": ("atlas state store vs raw redis-py SET/GET, interleaved repetitions, "
                      "per-repetition ratios"),
        "machine": desc,
        "server": {"url": args.url.split("@")[-1], "redis_version": info.get("redis_version"), **conf},
        "store": {"part_bytes": args.part_bytes, "batch": "pipelined parts, checksums in worker threads"},
        "keys_left_after_cleanup": left,
        "notes": notes,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{'checksum':>8} {'MB':>5} {'save MB/s':>10} {'SET MB/s':>9} {'ratio':>6} "
          f"{'load MB/s':>10} {'GET MB/s':>9} {'ratio':>6}")
    for r in results:
        print(f"{r['checksum']:>8} {r['size_mb']:>5} {r['store_save_MBps']:>10.0f} {r['raw_set_MBps']:>9.0f} "
              f"{r['save_ratio']:>6.2f} {r['store_load_MBps']:>10.0f} {r['raw_get_MBps']:>9.0f} "
              f"{r['load_ratio']:>6.2f}")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
