"""The shipped demo checkpoint: it loads, matches its recorded fingerprint, is what `atlas serve`
serves by default, and answers a pass-key question through the server's OpenAI-compatible API."""

from __future__ import annotations

import json
import random

import openai

from atlas.engine import Atlas, fingerprint, load_checkpoint
from atlas.engine.api import BUNDLED_CHECKPOINT
from atlas.engine.tasks import first_number, passkey

from .server_helpers import running_server


def test_bundled_checkpoint_loads_and_matches_its_fingerprint():
    meta = json.loads((BUNDLED_CHECKPOINT / "config.json").read_text())
    model = load_checkpoint(BUNDLED_CHECKPOINT)  # also refuses weights that do not match it
    assert fingerprint(model) == meta["fingerprint"]
    assert Atlas.load().fingerprint == meta["fingerprint"]  # the default model is the bundled one
    training = meta["training"]
    assert training["max_train_len"] <= 8192 and training["steps"] > 0
    assert (BUNDLED_CHECKPOINT / "model.safetensors").stat().st_size < 8 * 2**20  # a few MB


def test_demo_model_answers_a_passkey_question_through_the_server(tmp_path):
    # 400 tokens with the needle half-way: about 170 bytes back, beyond both stacked 64-token attention
    # windows, so the key comes from the ATLAS memory. The model is right on 16 of 16 such keys at
    # 300 and 512 tokens (docs/demo-model.md); this asks six.
    samples = [passkey(random.Random(seed), 400, depth=0.5) for seed in range(6)]
    with running_server(tmp_path, {}) as srv:
        oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        model = oai.models.list().data[0].id
        assert model == "atlas-demo"
        answers = [oai.completions.create(model=model, prompt=s.prompt, max_tokens=8, temperature=0)
                   .choices[0].text for s in samples]
    right = [first_number(a) == s.value for a, s in zip(answers, samples, strict=True)]
    assert sum(right) >= 5, list(zip([s.value for s in samples], answers, strict=True))
