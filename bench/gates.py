"""What a model's memory writes on long prompts: each memory layer's write gate (eta / eta_max),
forgetting (1 - alpha) and momentum gate (theta) on every chunk of one prompt with a pass key at its
middle, summed over the chunks that do not hold the key, with the chunks that write most.

Muon's update has the same size however small the gradient, so what a layer writes over a prompt
is about the sum of its write gates: next to the one chunk of the key, that sum over a million
tokens of text says whether the key survives (docs/demo-model.md, "On real text").

    python bench/gates.py NAME=CHECKPOINT_DIR [NAME=DIR ...] --tokens 262144 \
        [--task passkey_prose --prose runs/corpus --seed 0]

Results: bench/results/gates-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from atlas.engine.api import Atlas
from atlas.engine.checkpoint import fingerprint
from atlas.engine.machine import describe_machine, portable_path
from atlas.training.prompt import held_out_prose
from atlas.training.tasks import make_sample

TOP = 6  # the chunks that write most, per layer, shown with their text


@torch.no_grad()
def measure(path: Path, task: str, tokens: int, seed: int, prose: str | None) -> dict:
    atlas = Atlas.load(path, device="cpu")
    sample = make_sample(task, random.Random(seed), tokens, depth=0.5, prose=prose)
    ids = atlas.encode(sample.prompt)
    size = atlas.config.chunk_size
    key_at = len(atlas.encode(sample.prompt[:sample.prompt.index(sample.value)]))
    end = (key_at + len(sample.value)) // size
    key_chunks = {key_at // size, end, end + 1}  # the next chunk still writes the key (Omega's tail)
    mems = atlas.model.memories
    for mem in mems:
        mem.gate_log = []
    try:
        state = atlas.new_state()
        for i in range(0, len(ids), 1 << 14):
            state, _ = atlas.feed(state, ids[i:i + (1 << 14)])
        logged = [torch.stack(mem.gate_log)[:, 0].double().mean(1) for mem in mems]  # (chunks, 3)
    finally:
        for mem in mems:
            mem.gate_log = None
    layers = []
    for gates in logged:
        eta, forget, theta = gates[:, 0], 1 - gates[:, 1], gates[:, 2]
        other = torch.ones(len(eta), dtype=torch.bool)
        other[[c for c in key_chunks if c < len(eta)]] = False
        q = torch.quantile(eta[other], torch.tensor([0.5, 0.99], dtype=torch.float64)).tolist()
        top = torch.topk(torch.where(other, eta, -1.0), min(TOP, int(other.sum()))).indices.tolist()
        layers.append({
            "write_sum_elsewhere": round(float(eta[other].sum()), 4),
            "write_at_key": round(float(eta[~other].max()), 4),
            "write_median": float(f"{q[0]:.3g}"), "write_p99": float(f"{q[1]:.3g}"),
            "forget_sum": float(f"{float(forget.sum()):.3g}"), "theta_mean": round(float(theta.mean()), 5),
            "writes_most": [{"chunk": c, "write": round(float(eta[c]), 4),
                             "text": atlas.decode(ids[c * size:(c + 1) * size])} for c in sorted(top)]})
    return {"path": portable_path(path), "fingerprint": fingerprint(atlas.model), "task": task,
            "tokens": len(ids), "chunks": len(logged[0]) if logged else 0, "seed": seed, "layers": layers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="NAME=CHECKPOINT_DIR")
    ap.add_argument("--task", default="passkey_prose", help="passkey_prose or passkey (the synthetic filler)")
    ap.add_argument("--tokens", type=int, default=1 << 18)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prose", type=Path, help="corpus folder or text file (atlas corpus build)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/gates-cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    prose = held_out_prose(args.prose) if args.task.endswith("_prose") else None
    results = {"benchmark": "gates", "machine": describe_machine(torch.device("cpu")), "models": {}}
    if args.out.exists():  # one file for every model, task and length measured
        results["models"] = json.loads(args.out.read_text()).get("models", {})
    for spec in args.models:
        name, _, path = spec.partition("=")
        point = measure(Path(path), args.task, args.tokens, args.seed, prose)
        results["models"].setdefault(name, {})[f"{args.task}@{args.tokens}"] = point
        print(name, args.task, args.tokens, json.dumps([{k: v for k, v in layer.items() if k != "writes_most"}
                                                        for layer in point["layers"]]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
