"""Synthetic tasks, `atlas train` (checkpoints, resume, precision) and `atlas eval` (results, plot)."""

from __future__ import annotations

import json
import random
import re
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from atlas.engine import Atlas, load_checkpoint, save_checkpoint
from atlas.engine.api import BUNDLED_CHECKPOINT
from atlas.engine.machine import portable_path
from atlas.server.cli import app
from atlas.training.batches import task_batch
from atlas.training.config import DataConfig, GateConfig, TrainConfig
from atlas.training.evaluation import _decoy, evaluate_point, parse_length
from atlas.training.objective import task_loss
from atlas.training.prompt import held_out_prose
from atlas.training.tasks import (
    NAMES,
    NEEDLES_PREAMBLE,
    PASSKEY_FILLER,
    PASSKEY_PREAMBLE,
    PASSKEY_QUESTION,
    TASKS,
    copy,
    copy_block,
    first_number,
    make_sample,
    min_length,
    multi_needle,
    passkey,
    recall,
)
from atlas.training.trainer import run_training

from .helpers import tiny_config


@pytest.mark.parametrize("length", [244, 300, 1000, 4096, 100_003])
def test_passkey_prompt_is_the_standard_form_at_the_exact_length(length):
    s = passkey(random.Random(length), length, depth=0.5)
    assert len(s.prompt) == len(s.prompt.encode()) == length
    assert s.prompt.startswith(PASSKEY_PREAMBLE + "\n") and s.prompt.endswith(PASSKEY_QUESTION)
    needle = f"The pass key is {s.value}. Remember it. {s.value} is the pass key."
    assert s.prompt.count(needle) == 1 and s.answer == f" {s.value}." and 1 <= int(s.value) <= 50000
    if length > 1000:
        assert PASSKEY_FILLER in s.prompt
        at = s.prompt.index(needle) / length
        assert abs(at - 0.5) < 0.05


def test_passkey_depth_is_respected_at_both_ends():
    first = passkey(random.Random(0), 20_000, depth=0.0)
    last = passkey(random.Random(0), 20_000, depth=1.0)
    assert first.prompt.index("The pass key is") < 300
    assert last.prompt.index("The pass key is") > 19_000


def test_passkey_any_length_draws_keys_of_one_to_seven_digits_alike():
    samples = [make_sample("passkey_any_length", random.Random(seed), 2000) for seed in range(700)]
    counts = Counter(len(s.value) for s in samples)
    assert sorted(counts) == list(range(1, 8)) and min(counts.values()) > 70
    for s in samples[:20]:
        needle = f"The pass key is {s.value}. Remember it. {s.value} is the pass key."
        assert s.task == "passkey_any_length" and s.prompt.count(needle) == 1 and s.answer == f" {s.value}."
        assert len(s.prompt) == 2000 and s.prompt.endswith(PASSKEY_QUESTION) and s.value[0] != "0"


def test_passkey_runs_keys_repeat_digits_half_the_time():
    samples = [make_sample("passkey_runs", random.Random(seed), 2000) for seed in range(700)]
    assert sorted(Counter(len(s.value) for s in samples)) == list(range(1, 8))
    pairs = [(a, b) for s in samples for a, b in zip(s.value, s.value[1:], strict=False)]
    assert 0.4 < sum(a == b for a, b in pairs) / len(pairs) < 0.6
    for s in samples[:20]:
        needle = f"The pass key is {s.value}. Remember it. {s.value} is the pass key."
        assert s.task == "passkey_runs" and s.prompt.count(needle) == 1 and s.answer == f" {s.value}."
        assert len(s.prompt) == 2000 and s.prompt.endswith(PASSKEY_QUESTION) and s.value[0] != "0"
        second = s.prompt.index(needle) + needle.index(f" {s.value} is") + 1
        assert s.copies == ((second, second + len(s.value)),)


def test_multi_needle_asks_for_one_of_several_names():
    s = multi_needle(random.Random(3), 6000, n_needles=4, depth=0.25)
    assert len(s.prompt) == 6000
    needles = re.findall(r"The special magic number for (\w+) is (\d{7})\.", s.prompt)
    assert len(needles) == 4 and len({n for n, _ in needles}) == 4
    name = s.prompt.rsplit("magic number for ", 1)[1].split(" ")[0]
    assert f"The special magic number for {name} is {s.value}." in s.prompt
    assert (name, s.value) in needles
    assert s.answer == f" {s.value}."


@pytest.mark.parametrize("task", [*TASKS, "passkey_any_length", "passkey_runs", "recall", "recall_prose"])
def test_min_length_fits_and_shorter_is_refused(task):
    n = min_length(task)
    for seed in range(20):
        assert len(make_sample(task, random.Random(seed), n).prompt) == n
    with pytest.raises(ValueError, match="too short"):
        make_sample(task, random.Random(0), n // 2)


@pytest.mark.parametrize("length", [331, 700, 5000])
@pytest.mark.parametrize("in_prose", [False, True])
def test_recall_asks_for_every_needle_under_made_up_names(length, in_prose):
    for seed in range(10):
        s = recall(random.Random(seed), length, prose=held_out_prose() if in_prose else None)
        assert len(s.prompt) == length and s.task == ("recall_prose" if in_prose else "recall")
        body = s.prompt[len(NEEDLES_PREAMBLE) + 1:s.prompt.rindex("\n")]
        between = [t for t in re.split(r" ?The special magic number for \w+ is \d{7}\. ?", body) if t]
        prose = f"{held_out_prose()} {held_out_prose()}"  # the body wraps around to its start
        assert between and all((t in prose) == in_prose for t in between if len(t) > 20)
        needles = dict(re.findall(r"The special magic number for (\w+) is (\d{7})\.", s.prompt))
        assert 2 <= len(needles) <= 12 and not set(needles) & set(NAMES)
        asked = [re.search(r"number for (\w+)\?", q).group(1) for q, _ in s.follow_ups]
        asked.append(s.prompt.rsplit("magic number for ", 1)[1].split(" ")[0])
        assert sorted(asked) == sorted(needles)
        assert all(a == f" {needles[n]}." for n, (_, a) in zip(asked, s.follow_ups, strict=False))


def test_copy_scores_each_strings_second_writing():
    s = copy(random.Random(5), 1000)
    assert len(s.prompt) == 1000 and s.answer == "" and len(s.copies) > 10
    for a, b in s.copies:
        assert s.prompt[a:b] == s.prompt[a - (b - a) - 1:a - 1] and s.prompt[a - 1] == s.prompt[b] == "\n"


@pytest.mark.parametrize("gap", [0, 80, 300])
def test_copy_block_scores_each_blocks_second_writing_beyond_the_gap(gap):
    s = copy_block(random.Random(gap), 4000, gap)
    assert len(s.prompt) == 4000 and s.answer == "" and len(s.copies) >= 2
    prev_end = 0
    for a, b in s.copies:
        n = b - a + 1  # the block's length: all of its second writing but the first byte is scored
        assert gap < n <= 4 * max(64, gap + 1) + 16 and s.prompt[a - 1:b] == s.prompt[a - 1 - n:b - n]
        assert s.prompt[b - 1] == "\n" and a - 1 - n >= prev_end
        prev_end = b
    tokens, answer_mask, *_ = task_batch(0, DataConfig(min_len=256, max_len=256, tokens_per_batch=256,
                                                         tasks={"copy_block": 1}, needle_gap=gap), seed=1)
    assert int(answer_mask.sum()) >= 64  # a block that fits, however long the gap


@pytest.mark.parametrize("task", ["passkey", "passkey_any_length", "multi_needle", "recall"])
def test_needle_gap_keeps_every_needle_beyond_it(task):
    gap = 700
    for seed in range(20):
        s = make_sample(task, random.Random(seed), 2000, gap=gap)
        question = s.prompt.index(PASSKEY_QUESTION if task.startswith("passkey") else "What is")
        needles = [m.end() for m in re.finditer(r"(pass key is \d+\. Remember it\. \d+ is the pass key\."
                                                 r"|magic number for \w+ is \d+\.)", s.prompt)]
        assert len(s.prompt) == 2000 and needles and s.value in s.prompt[:needles[-1]]
        assert question - max(needles) >= gap
    # Without a gap the needles go anywhere, also next to the question.
    near = [make_sample("passkey", random.Random(seed), 2000) for seed in range(40)]
    assert min(len(s.prompt) - s.prompt.index(" is the pass key.") for s in near) < gap


def test_task_batch_lengthens_prompts_a_task_does_not_fit_and_pads_rows():
    cfg = DataConfig(min_len=256, max_len=256, tokens_per_batch=4096,
                     tasks={"passkey": 1, "multi_needle": 1, "copy": 1})
    tokens, answer_mask, prompt_mask, length, *_ = task_batch(0, cfg, seed=2)
    assert length == 256 and tokens.shape[0] == 16
    seen = set()
    for i in range(16):
        text = bytes(tokens[i].tolist()).decode()
        if text.startswith(PASSKEY_PREAMBLE):
            seen.add("passkey")
            assert text.index(PASSKEY_QUESTION) + len(PASSKEY_QUESTION) == 256
        elif text.startswith("Some special"):  # does not fit in 256: at its shortest instead
            seen.add("multi_needle")
            assert text.index("? The special magic number for ") < min_length("multi_needle")
            assert text[:min_length("multi_needle")].endswith(" is")
            assert bool(prompt_mask[i, min_length("multi_needle") - 2])
        else:
            seen.add("copy")
            assert not prompt_mask[i, 256:].any() and not answer_mask[i, 256:].any()
    assert seen == {"passkey", "multi_needle", "copy"}
    with pytest.raises(ValueError, match="unknown task"):
        DataConfig(tasks={"passkey": 1, "sorting": 1})


def test_first_number_and_lengths():
    assert first_number(" 31415. Remember") == "31415" and first_number(" none") is None
    assert parse_length("4k") == 4096 and parse_length("1M") == 1 << 20 and parse_length("1000") == 1000


def test_task_batch_is_a_function_of_seed_and_step_with_answer_masks():
    cfg = DataConfig(min_len=512, max_len=2048, curriculum_steps=10, tokens_per_batch=2048)
    a = task_batch(7, cfg, seed=1)
    b = task_batch(7, cfg, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3], strict=True)) and a.length == b.length
    assert torch.equal(a.end_mask, b.end_mask)
    tokens, answer_mask, prompt_mask, length, end_mask, *_ = a
    assert 512 <= length <= 2048 and tokens.shape[0] == max(1, 2048 // length)
    for row in range(tokens.shape[0]):
        assert bytes(tokens[row, :length].tolist()).decode().endswith("is")
        assert not (answer_mask[row] & prompt_mask[row]).any()
        assert int((answer_mask[row] | prompt_mask[row])[:length - 1].sum()) == length - 1
        assert not (end_mask[row] & ~answer_mask[row]).any()
    # the curriculum: early steps are short
    assert task_batch(0, cfg, seed=1).length == 512


def scored(tokens, mask, row) -> str:
    """The text the masked positions predict (position p predicts token p + 1)."""
    return bytes(tokens[row, 1:][mask[row]].tolist()).decode()


def test_task_batch_scores_answers_follow_ups_and_the_keys_second_mention():
    cfg = DataConfig(min_len=1500, max_len=1500, tokens_per_batch=3000, tasks={"passkey": 1.0})
    tokens, answer_mask, _, length, end_mask, *_ = task_batch(0, cfg, seed=0)
    for row in range(2):
        key = bytes(tokens[row, length:].tolist()).decode().split(".")[0].strip()
        text = bytes(tokens[row].tolist()).decode()
        assert f"The pass key is {key}. Remember it. {key} is the pass key." in text
        assert scored(tokens, answer_mask, row) == f"{key} {key}."
        assert scored(tokens, end_mask, row) == "."  # the answer's end, not the needle's second key
    cfg = DataConfig(min_len=1500, max_len=1500, tokens_per_batch=3000, tasks={"multi_needle": 1.0})
    tokens, answer_mask, _, length, end_mask, *_ = task_batch(0, cfg, seed=0)
    text = bytes(tokens[0].tolist()).decode()
    needles = dict(re.findall(r"The special magic number for (\w+) is (\d{7})\.", text[:length]))
    asked = re.findall(r"What is the special magic number for (\w+)\?", text)
    assert sorted(asked) == sorted(needles) and len(asked) == 4
    assert scored(tokens, answer_mask, 0) == "".join(f" {needles[n]}." for n in asked)
    assert scored(tokens, end_mask, 0) == "...."  # every asked value's end
    plain = cfg.model_copy(update={"follow_ups": False})
    tokens, answer_mask, _, length, end_mask, *_ = task_batch(0, plain, seed=0)
    assert scored(tokens, answer_mask, 0) == f" {needles[asked[0]]}."
    assert scored(tokens, end_mask, 0) == "."
    # Copies have no value and so no end.
    copies = DataConfig(min_len=512, max_len=512, tokens_per_batch=1024, tasks={"copy_block": 1, "copy": 1})
    batch = task_batch(0, copies, seed=0)
    assert batch.answer_mask.any() and not batch.end_mask.any()


def test_key_digits_bounds_the_keys_of_any_length_and_runs():
    for task in ("passkey_any_length", "passkey_runs"):
        keys = [make_sample(task, random.Random(seed), 1200, key_digits=5).value for seed in range(200)]
        assert max(map(len, keys)) == 5 and min(map(len, keys)) == 1
        assert max(len(make_sample(task, random.Random(seed), 1200).value) for seed in range(200)) == 7
    cfg = DataConfig(min_len=1200, max_len=1200, tokens_per_batch=1200 * 16, key_digits=2,
                     tasks={"passkey_any_length": 1, "passkey_runs": 1})
    batch = task_batch(0, cfg, seed=4)
    for row in range(16):
        answer = scored(batch.tokens, batch.answer_mask, row)
        assert re.fullmatch(r"(\d{1,2}) \1\.", answer), answer
    # The shortest prompt leaves room for the longest key asked for.
    assert min_length("passkey_runs", 9) == min_length("passkey_runs") + 2 * 2
    make_sample("passkey_runs", random.Random(0), min_length("passkey_runs", 9), key_digits=9)
    with pytest.raises(ValueError):
        DataConfig(key_digits=0)


def test_end_weight_weighs_the_byte_that_ends_each_value():
    from atlas.engine.model import AtlasModel

    torch.manual_seed(0)
    model = AtlasModel(tiny_config(d_model=16, n_heads=2, n_layers=1, chunk_size=16, swa_window=32,
                                   omega_window=2)).double()
    tokens, answer_mask, prompt_mask, _, end_mask, *_ = task_batch(
        0, DataConfig(min_len=300, max_len=300, tokens_per_batch=600, tasks={"passkey": 1.0}), seed=1)
    plain, parts = task_loss(model, tokens, answer_mask, prompt_mask, 0.0)
    same, parts1 = task_loss(model, tokens, answer_mask, prompt_mask, 0.0, end_mask=end_mask)
    heavy, parts4 = task_loss(model, tokens, answer_mask, prompt_mask, 0.0, end_mask=end_mask, end_weight=4.0)
    assert torch.allclose(plain, same) and "end" not in parts
    # The answer's loss is logged unweighted, the end's beside it; the total weighs the end 4 times.
    assert torch.allclose(parts4["answer"], parts["answer"]) and torch.allclose(parts4["end"], parts1["end"])
    n, m = int(answer_mask.sum()), int(end_mask.sum())
    assert torch.allclose(heavy, (parts["answer"] * n + 3 * parts4["end"] * m) / (n + 3 * m))


def tiny_train_config(tmp_path, **kw) -> TrainConfig:
    model = tiny_config(d_model=16, n_heads=2, n_layers=1, chunk_size=16, swa_window=32, omega_window=2)
    base = dict(name="t", seed=3, steps=4, device="cpu", out_dir=tmp_path / "run", checkpoint_every=2,
                model=model.model_dump(),
                data=dict(min_len=300, max_len=400, curriculum_steps=2, tokens_per_batch=600,
                          tasks={"passkey": 1.0}))
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow
def test_training_can_stop_and_continue_bit_exactly(tmp_path, monkeypatch):
    cfg = tiny_train_config(tmp_path / "x")
    straight = load_checkpoint(run_training(cfg, progress=False))
    # Stop after step 2 (a crash after its checkpoint), then run again: it resumes from
    # model/training_state/trainer.pt.
    cfg2 = tiny_train_config(tmp_path / "y")
    stopped = _run_until(cfg2, 2, monkeypatch)
    assert torch.load(stopped / "model" / "training_state" / "trainer.pt", weights_only=True)["step"] == 2
    again = load_checkpoint(run_training(cfg2, progress=False))
    for (n, p), q in zip(straight.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    log = [json.loads(line) for line in (stopped / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


def _run_until(cfg: TrainConfig, steps: int, monkeypatch):
    """Run `cfg` but stop before step `steps` + 1 (as if killed right after that checkpoint)."""
    import atlas.training.trainer as trainer

    real = trainer.lr_at

    class Stop(Exception):
        pass

    def limited(step, total, ocfg):
        if step >= steps:
            raise Stop
        return real(step, total, ocfg)

    with monkeypatch.context() as m:
        m.setattr(trainer, "lr_at", limited)
        with pytest.raises(Stop):
            run_training(cfg, progress=False)
    return cfg.out_dir


def test_every_shipped_training_config_is_valid():
    root = Path(__file__).resolve().parents[1]
    configs = {path: TrainConfig.load(path) for path in sorted((root / "configs" / "train").rglob("*.toml"))}
    assert len(configs) >= 10  # the demo model's eight phases and the baseline's two
    # A second phase starts from a shipped checkpoint or from what another shipped config writes.
    produced = {cfg.out_dir / "model" for cfg in configs.values()}
    for path, cfg in configs.items():
        if cfg.init_from is not None:
            assert cfg.init_from in produced or (root / cfg.init_from / "model.safetensors").exists(), path
            assert str(cfg.init_from).startswith("runs/"), path


def _gate_grads(gates: GateConfig | None):
    """task_loss's total and parts, the gradient of the total on the gate biases (eta, alpha) of a
    one-block memory model, and its chunk gates; the same weights and batch whatever the costs."""
    from atlas.engine.model import AtlasModel

    cfg = tiny_config(d_model=16, n_heads=2, n_layers=1, chunk_size=16, swa_window=32, omega_window=2)
    torch.manual_seed(0)
    model = AtlasModel(cfg).double()
    data = DataConfig(min_len=300, max_len=300, tokens_per_batch=600, tasks={"passkey": 1.0})
    tokens, answer_mask, prompt_mask, *_, quiet, facts = task_batch(0, data, seed=1)
    total, parts = task_loss(model, tokens, answer_mask, prompt_mask, 0.1, gates, quiet=quiet, facts=facts)
    total.backward()
    mem = model.blocks[0].mixer.mem
    assert mem.gate_log is None  # recording is off outside task_loss
    bias = mem.gates.bias.grad.view(4, cfg.n_heads)
    mem.gate_log = []
    with torch.no_grad():
        model(tokens[:, :-1], model.init_state(tokens.shape[0]))
    # One entry per committed chunk (an unfinished last chunk is never committed).
    assert len(mem.gate_log) == (tokens.shape[1] - 1) // 16 and mem.gate_log[0].shape == (2, cfg.n_heads, 3)
    return total.detach(), parts, bias, torch.stack(mem.gate_log).float()


@pytest.mark.slow
def test_gate_costs_charge_writing_and_forgetting_over_the_horizon():
    plain, parts, grad, g = _gate_grads(None)
    assert torch.allclose(parts["eta"], g[..., 0].mean())
    assert torch.allclose(parts["forget"], (1 - g[..., 1]).mean())
    assert torch.allclose(parts["theta.0"], g[..., 2].mean())
    costed, parts2, grad2, _ = _gate_grads(GateConfig(write_cost=2.0, forget_cost=0.5, momentum_cost=0.3,
                                                      horizon_chunks=1000))
    expected = (2.0 * torch.log1p(1000 * g[..., 0]).mean() + 0.5 * torch.log1p(1000 * (1 - g[..., 1])).mean()
                - 0.3 * torch.log(1 - g[..., 2]).mean())
    assert torch.allclose(costed - plain, expected)
    assert torch.allclose(parts["eta.0"], parts["eta"])  # the one memory layer
    # The costs push the write gate closed, retention up and the momentum's span down, on every head.
    (eta_grad, alpha_grad, theta_grad), (eta_grad2, alpha_grad2, theta_grad2) = grad[:3], grad2[:3]
    assert bool((eta_grad2 > eta_grad).all()) and bool((alpha_grad2 < alpha_grad).all())
    assert bool((theta_grad2 > theta_grad).all())
    # Without memory layers there is nothing to charge.
    from atlas.engine.model import AtlasModel

    swa = AtlasModel(tiny_config(d_model=16, n_heads=2, n_layers=1, chunk_size=16, swa_window=32,
                                 layers=["swa"]))
    tokens = torch.randint(0, 256, (1, 40))
    mask = torch.zeros(1, 39, dtype=torch.bool)
    mask[:, -3:] = True
    _, parts = task_loss(swa, tokens, mask, ~mask, 0.1, GateConfig(write_cost=1.0))
    assert set(parts) == {"answer", "prompt"}


def test_gate_costs_come_from_the_config_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('steps = 2\n[gates]\nwrite_cost = 0.5\nforget_cost = 0.1\nhorizon_chunks = 100\n')
    assert TrainConfig.load(path).gates == GateConfig(write_cost=0.5, forget_cost=0.1, horizon_chunks=100)
    path.write_text('[gates]\nwrite_costs = 0.5\n')
    with pytest.raises(ValueError, match="write_costs"):
        TrainConfig.load(path)
    path.write_text('[gates]\nforget_cost = -1\n')
    with pytest.raises(ValueError):
        TrainConfig.load(path)
    # One weight per memory layer: the default model has four.
    path.write_text('[gates]\nwrite_cost = [0.5, 0.1, 0.1, 0.1]\n')
    assert TrainConfig.load(path).gates.weights(4) == ([0.5, 0.1, 0.1, 0.1], *[[0.0] * 4] * 4)
    path.write_text('[gates]\nwrite_cost = [0.5, 0.1]\n')
    with pytest.raises(ValueError, match="2 weights for 4 memory layers"):
        TrainConfig.load(path)


@pytest.mark.slow
def test_stop_after_ends_a_run_part_way_on_its_schedule(tmp_path):
    straight = load_checkpoint(run_training(tiny_train_config(tmp_path / "x"), progress=False))
    cfg = tiny_train_config(tmp_path / "y", stop_after=2)
    part = run_training(cfg, progress=False)
    meta = json.loads((part / "config.json").read_text())["training"]
    assert meta["steps"] == 2 and len((tmp_path / "y" / "run" / "log.jsonl").read_text().splitlines()) == 2
    # Continued without stop_after, it is the straight run, bit for bit.
    rest = load_checkpoint(run_training(tiny_train_config(tmp_path / "y"), progress=False))
    for (n, p), q in zip(straight.state_dict().items(), rest.state_dict().values(), strict=True):
        assert torch.equal(p, q), n


def test_training_can_start_from_a_checkpoint(tmp_path):
    first = load_checkpoint(run_training(tiny_train_config(tmp_path / "a", steps=2), progress=False))
    start = tmp_path / "a" / "run" / "model"
    still = dict(steps=1, optim=dict(lr=1e-12, warmup_steps=1))  # one step that changes nothing
    second = load_checkpoint(run_training(tiny_train_config(tmp_path / "b", init_from=start, **still),
                                          progress=False))
    fresh = load_checkpoint(run_training(tiny_train_config(tmp_path / "c", **still), progress=False))
    record = json.loads((tmp_path / "b" / "run" / "model" / "config.json").read_text())["training"]
    assert record["steps"] == 1 and record["init_from"]["steps"] == 2  # both phases on record
    assert record["init_from"]["path"] == portable_path(start)  # no absolute path on record
    for (n, p), q in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n
    assert any(not torch.allclose(p, r, atol=1e-6)
               for p, r in zip(first.parameters(), fresh.parameters(), strict=True))
    wider = tiny_config(d_model=32, n_heads=2, n_layers=1, chunk_size=16, swa_window=32, omega_window=2)
    with pytest.raises(ValueError, match="does not fit"):
        run_training(tiny_train_config(tmp_path / "d", init_from=start, model=wider.model_dump()),
                     progress=False)


def test_a_second_phase_can_add_attention_to_a_memory_only_model(tmp_path):
    memory_only = dict(tiny_train_config(tmp_path).model.model_dump(), layers=["atlas"])
    first = load_checkpoint(run_training(tiny_train_config(tmp_path / "a", steps=2, model=memory_only),
                                         progress=False))
    start = tmp_path / "a" / "run" / "model"
    mag = dict(memory_only, layers=["mag"])
    with pytest.raises(ValueError, match="does not fit"):  # not without asking
        run_training(tiny_train_config(tmp_path / "b", init_from=start, model=mag), progress=False)
    still = dict(steps=1, optim=dict(lr=1e-12, warmup_steps=1))
    second = load_checkpoint(run_training(
        tiny_train_config(tmp_path / "c", init_from=start, init_partial=True, model=mag, **still),
        progress=False))
    theirs = second.state_dict()
    for name, p in first.state_dict().items():
        assert torch.allclose(p, theirs[name], atol=1e-6), name
    fresh = (tmp_path / "c" / "run" / "fresh-weights.txt").read_text().split()
    assert fresh and all(".attn" in n or "attn_norm" in n for n in fresh)
    assert set(fresh) == set(theirs) - set(first.state_dict())
    # The other way round would drop trained weights: refused even when partial.
    with pytest.raises(ValueError, match="does not fit"):
        run_training(tiny_train_config(tmp_path / "d", init_from=tmp_path / "c" / "run" / "model",
                                       init_partial=True, model=memory_only), progress=False)


def test_bf16_training_runs(tmp_path):
    cfg = tiny_train_config(tmp_path, precision="bf16", steps=1)
    run_training(cfg, progress=False)
    rec = json.loads((cfg.out_dir / "log.jsonl").read_text())
    assert rec["loss"] == rec["loss"] and rec["loss"] < 20  # finite


def test_train_and_eval_commands(tmp_path):
    runner = CliRunner()
    cfg = tiny_train_config(tmp_path, steps=2)
    conf = tmp_path / "train.json"
    conf.write_text(cfg.model_dump_json())
    res = runner.invoke(app, ["train", str(conf), "--out-dir", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    ckpt = tmp_path / "out" / "model"
    assert (ckpt / "model.safetensors").exists()
    out, png = tmp_path / "passkey.json", tmp_path / "passkey.png"
    res = runner.invoke(app, ["eval", "--model", f"tiny={ckpt}", "--lengths", "300,1k", "--trials", "2",
                              "--tasks", "passkey,multi_needle", "--device", "cpu", "--out", str(out),
                              "--plot", str(png)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    points = doc["models"]["tiny"]["points"]
    # multi_needle does not fit in 300 tokens: skipped, not failed
    assert [(p["task"], p["length"]) for p in points] == [("passkey", 300), ("passkey", 1024),
                                                          ("multi_needle", 1024)]
    assert all(len(p["details"]) == 2 and 0 <= p["accuracy"] <= 1 for p in points)
    assert doc["machine"]["cpu_cores"] and doc["models"]["tiny"]["training"]["steps"] == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --update: another model joins the file, the first one's points stay
    res = runner.invoke(app, ["eval", "--model", f"again={ckpt}", "--lengths", "300", "--trials", "2",
                              "--tasks", "passkey", "--device", "cpu", "--out", str(out), "--update"])
    assert res.exit_code == 0, res.output
    merged = json.loads(out.read_text())
    assert merged["models"]["tiny"]["points"] == points and merged["lengths"] == [300, 1024]
    assert [p["length"] for p in merged["models"]["again"]["points"]] == [300]
    assert all(m["machine"]["cpu_cores"] for m in merged["models"].values())
    res = runner.invoke(app, ["eval", "--model", f"again={ckpt}", "--lengths", "300", "--trials", "3",
                              "--tasks", "passkey", "--device", "cpu", "--out", str(out), "--update"])
    assert res.exit_code == 2 and "trials=2" in res.output
    # --update of the same weights at a new length: the points it does not measure again stay
    res = runner.invoke(app, ["eval", "--model", f"tiny={ckpt}", "--lengths", "512", "--trials", "2",
                              "--tasks", "passkey", "--device", "cpu", "--out", str(out), "--update"])
    assert res.exit_code == 0, res.output
    grown = json.loads(out.read_text())["models"]["tiny"]["points"]
    assert [(p["task"], p["length"]) for p in grown] == [*[(p["task"], p["length"]) for p in points],
                                                         ("passkey", 512)]
    # --gap: the needles stay that far from the question (the memory alone can answer)
    res = runner.invoke(app, ["eval", "--model", f"tiny={ckpt}", "--lengths", "1k", "--trials", "2",
                              "--tasks", "passkey", "--gap", "600", "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert doc["gap"] == 600 and len(doc["models"]["tiny"]["points"]) == 1


def test_cli_rejects_bad_configs_and_options(tmp_path):
    runner = CliRunner()
    bad = tmp_path / "bad.toml"
    bad.write_text('steps = -1\n[model]\nd_model = 7\n')
    res = runner.invoke(app, ["train", str(bad)])
    assert res.exit_code == 2 and "bad training config" in res.output
    res = runner.invoke(app, ["train", str(tmp_path / "missing.toml")])
    assert res.exit_code == 2
    res = runner.invoke(app, ["eval", "--tasks", "nope"])
    assert res.exit_code == 2 and "unknown task" in res.output
    res = runner.invoke(app, ["eval", "--model", f"x={tmp_path}"])
    assert res.exit_code == 2


def test_evaluate_point_scores_the_first_number_against_the_needle():
    """A model whose every answer is wrong scores 0; scoring reads the generated text."""
    from atlas.engine import AtlasModel

    torch.manual_seed(0)
    model = AtlasModel(tiny_config(d_model=16, n_heads=2, n_layers=1, chunk_size=16, swa_window=32)).eval()
    p = evaluate_point(model, "passkey", 400, trials=3)
    assert p.trials == 3 and len(p.details) == 3
    assert p.correct == sum(d.correct for d in p.details)
    assert {round(d.depth, 4) for d in p.details} == {round((i + 0.5) / 3, 4) for i in range(3)}
    scored = [x for d in p.details for x in d.value_nats]
    assert len(scored) == sum(len(d.value) for d in p.details)
    assert p.value_nats == pytest.approx(sum(scored) / len(scored), abs=1e-3)
    assert p.value_nats_by_byte[0] == pytest.approx(sum(d.value_nats[0] for d in p.details) / 3, abs=1e-3)
    assert min(scored) > 0.5  # an untrained model: no better than guessing
    assert p.value_nats == pytest.approx(p.decoy_nats, rel=0.2)


def test_value_nats_is_the_teacher_forced_loss_of_the_value():
    """Fed the right answer after the prompt, the bundled model is nearly sure of a key it
    retrieves; the figure is the mean loss over the value's bytes alone, with the byte after the
    value (where the model must stop) apart."""
    import torch.nn.functional as F

    from atlas.engine.api import BUNDLED_CHECKPOINT
    from atlas.engine.tokenizer import ByteTokenizer
    from atlas.training.tasks import passkey

    model = load_checkpoint(BUNDLED_CHECKPOINT)
    p = evaluate_point(model, "passkey", 300, trials=2)
    assert p.correct == 2 and p.value_nats < 0.5 < 2 < p.decoy_nats
    assert p.prefix_correct == 2 and all(d.prefix_correct for d in p.details)
    for task in ("passkey", "multi_needle"):  # decoys: the task's own kind of value, as long, not it
        sample = make_sample(task, random.Random(1), 600)
        decoy = _decoy(sample, seed=0)
        assert decoy.isdigit() and len(decoy) == len(sample.value) and decoy not in sample.prompt
    # The same figure by hand for the first trial: the whole sequence in one call.
    first = passkey(random.Random(zlib.crc32(b"0:passkey:300")), 300, depth=0.25)
    assert first.value == p.details[0].value
    tok = ByteTokenizer()
    ids = torch.tensor([tok.encode(first.prompt + first.answer)])
    with torch.no_grad():
        logits, _ = model(ids[:, :-1], model.init_state(1))
    at = 300 + first.answer.index(first.value)  # the value's first byte
    n = len(first.value) + 1  # and the "." after it
    nll = F.cross_entropy(logits[0, at - 1:at - 1 + n], ids[0, at:at + n], reduction="none")
    assert nll[:-1].tolist() == pytest.approx(p.details[0].value_nats, abs=1e-3)
    assert nll[-1].item() == pytest.approx(p.details[0].end_nats, abs=1e-3)
    assert p.end_nats == pytest.approx(sum(d.end_nats for d in p.details) / 2, abs=1e-3)


def test_score_is_strict_about_where_the_value_ends_and_prefix_is_not():
    from atlas.training.evaluation import score

    assert score(" 9901. T", "9901") == (True, True)
    assert score(" 99011.", "9901") == (False, True)  # one digit too many: right by the prefix only
    assert score(" 990. Th", "9901") == (False, False)
    assert score(" yellow.", "9901") == (False, False)
    assert score(" 8673.", "673") == (False, False)


def test_checkpoint_records_its_fingerprint_and_refuses_damaged_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    from atlas.engine import AtlasModel, fingerprint, save_checkpoint

    model = AtlasModel(tiny_config(d_model=16, n_heads=2, n_layers=1))
    save_checkpoint(model, tmp_path)
    recorded = json.loads((tmp_path / "config.json").read_text())["fingerprint"]
    assert fingerprint(load_checkpoint(tmp_path)) == recorded == fingerprint(model)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["embed.weight"][3, 5] += 1e-3
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="fingerprint"):
        load_checkpoint(tmp_path)



def test_tasks_mark_their_facts_and_the_batch_the_text_without_them():
    from atlas.training.tasks import make_sample

    prose = "It rained on the hill. " * 400
    for task in ("passkey", "passkey_prose", "multi_needle_prose", "babi_single", "babi_count",
                 "babi_people"):
        s = make_sample(task, random.Random(3), 4000, prose=prose)
        assert s.facts, task
        texts = [s.prompt[a:b] for a, b in s.facts]
        assert all(t.endswith(".") and t[0].isupper() for t in texts), (task, texts)
        if task.startswith("passkey"):
            assert texts == [f"The pass key is {s.value}. Remember it. {s.value} is the pass key."]
    assert make_sample("copy", random.Random(3), 4000).facts is None  # does not say

    data = DataConfig(min_len=2000, max_len=2000, tokens_per_batch=4000, tasks={"passkey": 1.0, "copy": 1.0})
    b = task_batch(0, data, seed=5)
    for row in range(b.tokens.shape[0]):
        text = bytes(b.tokens[row].tolist()).decode()
        quiet = b.quiet[row]
        if "The pass key is " not in text:  # a copy prompt: nothing is quiet
            assert not quiet.any()
            continue
        key_at = text.index("The pass key is ")
        assert quiet[:key_at].all() and not quiet[key_at:key_at + 60].any()
        assert not quiet[text.index("\nWhat is the pass key"):].any()  # nor the question and answer
        fact = text.index(" is the pass key.", key_at) + len(" is the pass key.")
        assert b.facts[row].nonzero().flatten().tolist() == list(range(key_at, fact))


@pytest.mark.slow
def test_the_quiet_write_cost_charges_the_write_gates_where_no_fact_is():
    plain, parts, grad, g = _gate_grads(None)
    costed, parts2, grad2, _ = _gate_grads(GateConfig(quiet_write_cost=2.0, horizon_chunks=1000))
    quiet = parts["quiet.0"]
    assert 0 < float(quiet.detach()) < 1 and torch.allclose(quiet, parts2["quiet.0"])
    assert float(costed - plain) > 0
    assert bool((grad2[0] > grad[0]).all())  # pushes the write gate closed
    assert torch.allclose(grad2[1:], grad[1:])  # and nothing else


@pytest.mark.slow
def test_the_fact_write_cost_pulls_the_write_gates_open_where_a_fact_is():
    plain, parts, grad, _ = _gate_grads(None)
    costed, parts2, grad2, _ = _gate_grads(GateConfig(fact_write_cost=0.5))
    fact = parts["fact.0"]
    assert 0 < float(fact.detach()) < 1 and torch.allclose(fact, parts2["fact.0"])
    assert float(costed - plain) >= -0.5 * float(torch.log(fact.detach())) > 0  # mean -log >= -log mean
    assert bool((grad2[0] < grad[0]).all())  # pushes the write gate open
    assert torch.allclose(grad2[1:], grad[1:])  # and nothing else


def test_gates_benchmark_sums_what_each_layer_writes_beside_the_key(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "gates.json"
    script = Path(__file__).resolve().parents[1] / "bench" / "gates.py"
    from atlas.engine.api import BUNDLED_CHECKPOINT

    subprocess.run([sys.executable, str(script), f"demo={BUNDLED_CHECKPOINT}", "--task", "passkey",
                    "--tokens", "4096", "--out", str(out)], check=True, capture_output=True, timeout=300)
    point = json.loads(out.read_text())["models"]["demo"]["passkey@4096"]
    assert point["chunks"] == 4096 // 64 and len(point["layers"]) == 2
    second = point["layers"][1]
    assert second["write_at_key"] > 0.5 > second["write_sum_elsewhere"]  # the key's chunk, not the filler
    assert all(len(row["text"]) == 64 for row in second["writes_most"])
    assert str(tmp_path) not in out.read_text()


def test_a_run_resumed_in_its_folder_must_train_the_same_model(tmp_path, monkeypatch):
    cfg = tiny_train_config(tmp_path)
    _run_until(cfg, 2, monkeypatch)  # a checkpoint at step 2 to resume from
    record = (cfg.out_dir / "train-config.json").read_text()
    wider = TrainConfig(**{**cfg.model_dump(), "model": {**cfg.model.model_dump(), "d_model": 32}})
    with pytest.raises(ValueError, match=r"another model \(d_model 16 -> 32\).*--no-resume"):
        run_training(wider, progress=False)
    assert (cfg.out_dir / "train-config.json").read_text() == record  # the run's record is kept
    fewer = TrainConfig(**{**cfg.model_dump(), "steps": 1})
    with pytest.raises(ValueError, match="at step 2, past the 1 asked for"):
        run_training(fewer, progress=False)
    assert (cfg.out_dir / "train-config.json").read_text() == record


def test_command_line_mistakes_get_one_line_and_exit_2(tmp_path):
    """Bad values, devices, folders and configs: a sentence naming the problem, never a traceback."""
    runner = CliRunner()
    damaged = tmp_path / "damaged"
    save_checkpoint(load_checkpoint(BUNDLED_CHECKPOINT), damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (tmp_path / "f.bin").write_bytes(b"hello")
    bad_configs = {"grad_clip = -1.0": "greater than 0", "learning_rate = 1e-3": "learning_rate",
                   "lr = 1e-3\nmin_lr_ratio = 2": "min_lr_ratio"}
    cases = {("eval", "--lengths", "-1k"): "at least 1 token",
             ("eval", "--lengths", "10"): "no task fits",
             ("eval", "--tasks", ","): "names no task",
             ("eval", "--gap", "100000", "--lengths", "1k"): "with --gap 100000",
             ("eval", "--device", "tpu"): "ATLAS runs on auto, cpu, cuda",
             ("eval", "--model", f"x={damaged}", "--lengths", "1k"): "not a readable safetensors file",
             ("demo", "--checkpoint", str(damaged)): "not a readable safetensors file",
             ("demo", "--device", "tpu"): "ATLAS runs on auto, cpu, cuda",
             ("serve", "--device", "tpu"): "ATLAS runs on auto, cpu, cuda",
             ("serve", "--log-level", "loud"): "ATLAS_LOG_LEVEL",
             ("tokenizer", "train", str(tmp_path / "f.bin"), "--out", str(tmp_path / "t.json")):
                 "text files are"}
    for i, (line, why) in enumerate(bad_configs.items()):
        path = tmp_path / f"c{i}.toml"
        path.write_text(f"steps = 1\n[optim]\n{line}\n")
        cases[("train", str(path))] = why
    (tmp_path / "lengths.toml").write_text("steps = 1\n[data]\nmin_len = 512\nmax_len = 256\n")
    cases[("train", str(tmp_path / "lengths.toml"))] = "min_len 512 is over max_len 256"
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"seed": 0, "gap": 0, "trials": 8}))
    cases[("eval", "--update", "--out", str(partial), "--lengths", "1k")] = "not an eval results file"
    (tmp_path / "file").write_text("")
    cases[("eval", "--lengths", "1k", "--trials", "1", "--tasks", "passkey", "--out",
           str(tmp_path / "r.json"), "--plot", str(tmp_path / "file" / "p.png"))] = "the results are in"
    for args, why in cases.items():
        r = runner.invoke(app, list(args))
        assert r.exit_code == 2 and why in r.output, (args, r.output)
        assert "Traceback" not in r.output, args
    bad_settings = [({"ATLAS_MAX_BATCH": "abc"}, "ATLAS_MAX_BATCH"),
                    ({"ATLAS_NS_PRECISION": "x"}, "NS_PRECISION"),
                    ({"ATLAS_DRAIN_TIMEOUT_S": "inf"}, "finite"),
                    ({"ATLAS_API_KEYS": "sk-secret:ten ant"}, "tenant")]
    for env, why in bad_settings:
        r = runner.invoke(app, ["serve"], env=env)  # the engine's and store's settings too, at start
        assert r.exit_code == 2 and why in r.output and "sk-secret" not in r.output, (env, r.output)
    doc = tmp_path / "doc.txt"
    doc.write_text("héllo wörld " * 20, encoding="utf-8")
    r = runner.invoke(app, ["demo", "--text", str(doc), "--tokens", "64", "--max-tokens", "2",
                            "--question", "Qué? C:\\Users\\n"])
    assert r.exit_code == 0 and "Qué? C:\\Users\n" in r.output, r.output  # \n read, the rest as typed
    with pytest.raises(ValueError, match="position"):
        Atlas.load().new_state(position=-5)
