"""lm-evaluation-harness through HTTP: its ``local-completions`` model scores a small multiple-choice
task (a task YAML and a local JSONL dataset written here) against a real ``atlas serve``, and its
logged log-likelihoods equal the engine's own, computed in process (sum of the continuation's
log-probabilities after the context) within 1e-4.

lm_eval's loglikelihood request is ``{"prompt": [[ids of context + continuation]], "max_tokens": 1,
"logprobs": 1, "echo": true, "temperature": 0}``; it sums ``token_logprobs[ctxlen:-1]`` (the last
entry is the generated token's). It needs a tokenizer on its side to cut context from continuation:
offline, with no Hugging Face tokenizer to download, the evaluation here hands it the served model's
byte tokenizer (docs/openai.md, "lm-evaluation-harness")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from atlas.engine import Atlas

from .openai_helpers import byte_model
from .server_helpers import running_server

pytest.importorskip("lm_eval")

DOCS = [
    {"question": "The sky on a clear day is", "choices": [" blue", " green", " loud", " square"],
     "answer": 0},
    {"question": "Two plus two equals", "choices": [" four", " five", " seven"], "answer": 0},
    {"question": "Water freezes at zero degrees", "choices": [" Celsius", " Kelvin"], "answer": 0},
    {"question": "A cat says", "choices": [" meow", " moo", " quack", " baa"], "answer": 0},
]

TASK = """\
task: atlas_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""

RUN = textwrap.dedent("""\
    import json, sys
    from lm_eval import simple_evaluate
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    url, tasks, out = sys.argv[1:4]

    class ByteTokenizer:  # the served model's tokenizer (bytes), as lm_eval's API models call it
        eot_token = 0
        def encode(self, text): return list(text.encode("utf-8"))
        def decode(self, ids): return bytes(ids).decode("utf-8", errors="replace")
        def batch_decode(self, batch): return [self.decode(ids) for ids in batch]

    lm = LocalCompletionsAPI(base_url=url + "/v1/completions", model="byte-atlas", tokenizer_backend=None,
                             max_retries=1, num_concurrent=1)
    lm.tokenizer, lm.tokenizer_backend, lm.tokenized_requests = ByteTokenizer(), "bytes", True
    res = simple_evaluate(model=lm, tasks=["atlas_mc"], task_manager=TaskManager(include_path=tasks),
                          log_samples=True, bootstrap_iters=0)
    samples = [{"arguments": [list(a) for a in s["arguments"]], "resps": s["resps"]}
               for s in res["samples"]["atlas_mc"]]
    json.dump({"samples": samples, "acc": res["results"]["atlas_mc"]["acc,none"]}, open(out, "w"))
""")


def test_lm_eval_loglikelihoods_equal_the_engines(tmp_path: Path) -> None:
    folder = byte_model(tmp_path / "byte-atlas")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "atlas_mc.yaml").write_text(TASK.format(data=data))
    (tmp_path / "run.py").write_text(RUN)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}
    settings = {"ATLAS_MODEL": str(folder), "ATLAS_INGEST_CHUNKS_PER_STEP": "1"}
    with running_server(tmp_path / "srv", settings) as srv:
        proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), srv.url, str(tasks),
                               str(tmp_path / "out.json")], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads((tmp_path / "out.json").read_text())
    samples = got["samples"]
    assert len(samples) == len(DOCS) and 0.0 <= got["acc"] <= 1.0

    atlas = Atlas.load(folder, device="cpu")
    worst, count = 0.0, 0
    for s in samples:
        for (context, continuation), resp in zip(s["arguments"], s["resps"], strict=True):
            ll, _greedy = resp[0]
            ctx, cont = list(context.encode()), list(continuation.encode())
            _, entries = atlas.prompt_logprobs(atlas.new_state(), ctx + cont)
            want = sum(e.logprob for e in entries[len(ctx):] if e is not None)
            worst = max(worst, abs(ll - want))
            count += 1
    assert count == sum(len(d["choices"]) for d in DOCS)
    assert worst < 1e-4, worst
    print(f"lm_eval: {count} log-likelihoods, max |lm_eval - engine| = {worst:.2e}")
