"""Training throughput with 1 and with N processes (torchrun, DDP on gloo on the CPU; NCCL on GPUs):
tokens a second for the whole job and per process, on the same config, the same micro-batches.

    python bench/training_scaling.py                       # configs/train/shakespeare.toml, 1 and 2 processes
    python bench/training_scaling.py --config configs/train/shakespeare.toml --steps 20 --processes 1,2

Each run trains `--steps` steps from scratch into a temporary folder (needs the config's tokenizer,
e.g. `atlas tokenizer train` as docs/training.md says); the first `--warmup` steps (the corpus
opening, the first allocations) are left out. The figure is the median over steps of the step's
tokens over its wall time, so that a step slowed by another process on the machine does not decide
it; the spread (min to max) is saved beside it.

Writes bench/results/training-scaling-<device>.json (machine, settings, one entry per process count).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from atlas.engine.machine import describe_machine, portable_path
from atlas.training.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def run(config: Path, processes: int, steps: int, out: Path) -> list[dict]:
    cfg = TrainConfig.load(config)
    cfg = cfg.model_copy(update={"steps": steps, "out_dir": out, "checkpoint_every": steps, "log_csv": False})
    path = out.with_suffix(".json")
    path.write_text(cfg.model_dump_json())
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    if processes == 1:
        cmd = [sys.executable, "-m", "atlas.training", str(path)]
    else:
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(processes), "-m", "atlas.training", str(path)]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "train" / "shakespeare.toml")
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    cfg = TrainConfig.load(args.config)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    results: dict = {"benchmark": "training_scaling", "machine": describe_machine(device),
                     "config": portable_path(args.config), "steps": args.steps, "warmup_steps": args.warmup,
                     "micro_batches": cfg.micro_batches, "precision": cfg.precision,
                     "tokens_per_step": (cfg.corpus.batch_rows * cfg.corpus.seq_len if cfg.corpus else None),
                     "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.processes.split(",")):
            log = run(args.config, n, args.steps, Path(tmp) / f"p{n}")
            rates = [r["tokens_per_s"] for r in log[args.warmup:]]
            total = statistics.median(rates)
            entry = {"processes": n, "tokens_per_s": round(total, 1),
                     "tokens_per_s_per_process": round(total / n, 1), "tokens_per_s_min": min(rates),
                     "tokens_per_s_max": max(rates),
                     "final_loss": log[-1]["loss"], "losses": [r["loss"] for r in log]}
            results["runs"].append(entry)
            print(f"{n} process(es): {total:,.0f} tokens/s ({total / n:,.0f} per process; "
                  f"{min(rates):,.0f} to {max(rates):,.0f}), loss after {args.steps} steps {log[-1]['loss']}")
    base = results["runs"][0]["tokens_per_s"]
    for entry in results["runs"]:
        entry["speedup"] = round(entry["tokens_per_s"] / base, 2)
    results["machine"]["load_average_at_end"] = describe_machine(device)["load_average_at_start"]
    out = args.out or ROOT / "bench" / "results" / f"training-scaling-{device.type}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results {portable_path(out)}")


if __name__ == "__main__":
    main()
