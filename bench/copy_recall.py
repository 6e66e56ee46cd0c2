"""Recall through the memory on copy_block prompts: the loss and accuracy of each block's repeat
(which only the memory can supply once the block is longer than the attention window, or always
in a memory-only model) against those of its first writing, teacher-forced.

    python bench/copy_recall.py NAME=CHECKPOINT_DIR [NAME=DIR ...] [--length 1024 --prompts 16 --gap 0]

Results: bench/results/copy-recall-DEVICE.json.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from atlas.engine.checkpoint import fingerprint, load_checkpoint, read_config
from atlas.engine.machine import describe_machine, portable_path, with_portable_paths
from atlas.engine.tokenizer import ByteTokenizer
from atlas.training.tasks import copy_block


@torch.no_grad()
def measure(path: Path, length: int, prompts: int, gap: int, seed: int) -> dict:
    model = load_checkpoint(path)
    tok = ByteTokenizer()
    samples = [copy_block(random.Random(seed + i), length, gap) for i in range(prompts)]
    ids = torch.tensor([tok.encode(s.prompt) for s in samples])
    logits, _ = model(ids[:, :-1], model.init_state(prompts))
    ce = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(prompts, -1)
    right = logits.argmax(-1) == ids[:, 1:]
    repeat, first = torch.zeros(ce.shape, dtype=torch.bool), torch.zeros(ce.shape, dtype=torch.bool)
    for i, s in enumerate(samples):
        for a, b in s.copies:  # the logits at p predict byte p + 1
            n = b - a + 1
            repeat[i, a - 1:b - 1] = True
            first[i, a - 1 - n:b - 1 - n] = True
    _, meta = read_config(path)
    return {"path": portable_path(path), "fingerprint": fingerprint(model),
            "training": with_portable_paths(meta.get("training")),
            "repeat_nats_per_byte": round(ce[repeat].mean().item(), 4),
            "first_writing_nats_per_byte": round(ce[first].mean().item(), 4),
            "repeat_accuracy": round(right[repeat].float().mean().item(), 4),
            "first_writing_accuracy": round(right[first].float().mean().item(), 4),
            "scored_bytes": int(repeat.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="NAME=CHECKPOINT_DIR")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--gap", type=int, default=0)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path("bench/results/copy-recall-cpu.json"))
    args = ap.parse_args()
    results = {"benchmark": "copy_recall", "machine": describe_machine(torch.device("cpu")),
               "length": args.length, "prompts": args.prompts, "gap": args.gap, "seed": args.seed,
               "models": {}}
    for spec in args.models:
        name, _, path = spec.partition("=")
        r = measure(Path(path), args.length, args.prompts, args.gap, args.seed)
        results["models"][name] = r
        print(f"{name:>20}: repeat {r['repeat_nats_per_byte']:.3f} nats/byte "
              f"({100 * r['repeat_accuracy']:.0f}% right), "
              f"first writing {r['first_writing_nats_per_byte']:.3f} "
              f"({100 * r['first_writing_accuracy']:.0f}%)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"results {args.out}")


if __name__ == "__main__":
    main()
