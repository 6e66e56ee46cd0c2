"""`atlas train` over several processes (torchrun, gloo on the CPU): the same steps as one process
running the same micro-batches, a resume equal to the run never stopped, a dead rank ending the
job; and bf16's inner loop at the reference's fp32.

Tolerance of "the same loss". Two processes run exactly the micro-batches one process runs (the
data depends on `micro_batches`, not on the processes, training/data.py), so only the order of
floating-point sums differs: the test process computes with its threads, each torchrun worker with
one, and the gradients of the two micro-batches meet in gloo's all-reduce instead of in the
accumulated `.grad`. That moves fp32 results by a few units in the last place (measured: weights
within 2e-6 after 4 steps). The first step's loss (the same weights) must then agree to 1e-6, and
each later one to 1e-5 relative; the gradient norm (logged to 4 decimals), which would double
if the processes summed instead of averaging, to 1e-3. Feeding a rank the other rank's rows, or a
rank dropping its gradient, moves the loss by 1e-3 or more within two steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from atlas.engine.checkpoint import load_checkpoint
from atlas.training.trainer import TrainConfig, run_training

from .helpers import TEST_DATA, shared_text, tiny_config

pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[1]
CORPUS = shared_text("tinyshakespeare.txt") or TEST_DATA / "utf8-sample.txt"


def corpus_config(out: Path, **kw) -> TrainConfig:
    model = tiny_config(d_model=16, n_heads=2, n_layers=2, chunk_size=16, swa_window=32, omega_window=2)
    base = dict(name="dist", seed=5, steps=4, device="cpu", out_dir=out, checkpoint_every=2,
                model=model.model_dump(), micro_batches=2, optim=dict(lr=3e-3, warmup_steps=2),
                corpus=dict(files=[str(CORPUS)], seq_len=48, batch_rows=4))
    base.update(kw)
    return TrainConfig(**base)


def torchrun(cfg: TrainConfig, processes: int = 2, wait: bool = True) -> subprocess.Popen:
    """`torchrun --nproc-per-node N -m atlas.training CONFIG`, as the docs say."""
    path = cfg.out_dir.with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cfg.model_dump_json())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
           "-m", "atlas.training", str(path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    if wait:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]
    return proc


def losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 4 steps by one process (both micro-batches) and by two torchrun processes (one each)."""
    root = tmp_path_factory.mktemp("dist")
    one = corpus_config(root / "one")
    run_training(one, progress=False)
    two = corpus_config(root / "two")
    torchrun(two)
    return {"one": one.out_dir, "two": two.out_dir, "root": root}


def test_two_processes_compute_the_loss_of_one(runs):
    one, two = losses(runs["one"]), losses(runs["two"])
    assert [r["step"] for r in two] == [1, 2, 3, 4] and two[0]["batch"] == 4
    assert abs(one[0]["loss"] - two[0]["loss"]) <= 1e-6 * one[0]["loss"]
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-3 * a["grad_norm"] + 1e-4, (a, b)
        assert a["tokens"] == b["tokens"] == 4 * 48 and a["lr"] == b["lr"]
    w1, w2 = (load_checkpoint(runs[k] / "model").state_dict() for k in ("one", "two"))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4
    record = json.loads((runs["two"] / "model" / "config.json").read_text())["training"]
    assert record["processes"] == 2 and record["tokens"] == 4 * 4 * 48


def test_two_processes_resume_as_if_never_stopped(runs):
    # Stopped after step 2's checkpoint (as if killed there), then the same command again.
    cfg = corpus_config(runs["root"] / "resumed", stop_after=2)
    torchrun(cfg)
    state = torch.load(cfg.out_dir / "model" / "training_state" / "trainer.pt", weights_only=True)
    assert state["step"] == 2 and set(state["data"]["slots"]) == {"0", "1"} and "rng" in state
    torchrun(cfg.model_copy(update={"stop_after": None}))
    straight, resumed = losses(runs["two"]), losses(cfg.out_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    keys = ("loss", "grad_norm", "mean_eta", "lr", "tokens")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]
    w1, w2 = (load_checkpoint(p / "model").state_dict() for p in (runs["two"], cfg.out_dir))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_a_dead_rank_ends_the_job(tmp_path):
    cfg = corpus_config(tmp_path / "dies", steps=100_000, checkpoint_every=100_000, dist_timeout_s=30)
    proc = torchrun(cfg, wait=False)
    try:
        deadline = time.monotonic() + 120
        while not (cfg.out_dir / "log.jsonl").exists() or not (cfg.out_dir / "log.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if p.environ().get("LOCAL_RANK") == "1"]
        assert workers
        workers[0].send_signal(signal.SIGKILL)
        start = time.monotonic()
        out, _ = proc.communicate(timeout=90)  # no hang: torchrun stops the other rank and exits
        assert proc.returncode != 0 and time.monotonic() - start < 60
        assert "SIGKILL" in out or "Signal 9" in out or "exitcode" in out, out[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_fsdp_with_activation_checkpointing_computes_the_loss_of_one(runs):
    cfg = corpus_config(runs["root"] / "fsdp", parallel="fsdp", activation_checkpointing=True)
    torchrun(cfg)
    one, fsdp = losses(runs["one"]), losses(cfg.out_dir)
    for a, b in zip(one, fsdp, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"], (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-3 * a["grad_norm"] + 1e-4, (a, b)
    # Its checkpoint is a whole model (the shards gathered), and it resumes under DDP too.
    w1, w2 = (load_checkpoint(p / "model").state_dict() for p in (runs["one"], cfg.out_dir))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4
    torchrun(cfg.model_copy(update={"parallel": "ddp", "steps": 5}))
    assert [r["step"] for r in losses(cfg.out_dir)] == [1, 2, 3, 4, 5]


# -- bf16 --------------------------------------------------------------------------------------------

def test_bf16_keeps_the_memory_inner_loop_in_fp32(monkeypatch):
    """Autocast would run the inner loop's matrix products in bf16 (the Omega gradients would come
    out bf16); the memory runs them outside autocast, in fp32, as docs/model.md "Precision" requires,
    while the rest of the model runs under autocast."""
    from atlas.engine.model import AtlasModel
    from atlas.engine.model import reference_step as step
    from atlas.training.precision import autocast

    seen: list[torch.dtype] = []
    grads, ns = step.memory_grads, step.newton_schulz_many

    def spy(fn):
        def run(*args):
            out = fn(*args)
            seen.extend(t.dtype for t in (out if isinstance(out, tuple) else (out,)))
            return out
        return run

    monkeypatch.setattr(step, "memory_grads", spy(grads))
    monkeypatch.setattr(step, "newton_schulz_many", spy(ns))
    torch.manual_seed(0)
    model = AtlasModel(tiny_config(layers=["atlas"]))
    tokens = torch.randint(0, 256, (2, 33))
    with autocast("cpu", "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16  # autocast is on
        _, state = model(tokens, model.init_state(2))
    assert seen and set(seen) == {torch.float32}
    assert state["layers.0.mem.W1"].dtype == state["layers.0.mem.S1"].dtype == torch.float32


def test_bf16_with_activation_checkpointing_trains_like_fp32(runs, tmp_path):
    bf16 = corpus_config(tmp_path / "bf16", steps=2, stop_after=1, precision="bf16",
                         activation_checkpointing=True)
    run_training(bf16, progress=False)
    x, y = losses(runs["one"])[0], losses(bf16.out_dir)[0]  # the same weights and batch
    assert abs(x["loss"] - y["loss"]) < 1e-2 * x["loss"], (x, y)  # a few bf16 epsilons (2^-8)
    assert abs(x["grad_norm"] - y["grad_norm"]) < 5e-2 * x["grad_norm"], (x, y)
    # The weights stay fp32 (the master copy AdamW updates); the checkpoint holds them.
    assert all(t.dtype == torch.float32 for t in load_checkpoint(bf16.out_dir / "model", dtype=None)
               .state_dict().values())
