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
    model = load_checkpoint(BUNDLED_CHECKPOINT)  # also checks the recorded fingerprint
    assert fingerprint(model) == meta["fingerprint"]
    assert Atlas.load().fingerprint == meta["fingerprint"]  # the default model is the bundled one
    training = meta["training"]
    assert training["max_train_len"] <= 8192 and training["steps"] > 0
    size = (BUNDLED_CHECKPOINT / "model.safetensors").stat().st_size
    assert size < 8 * 2**20  # a few MB, committed in the repository


def test_demo_model_answers_a_passkey_question_through_the_server(tmp_path):
    # Beyond the attention window (256 tokens): the key must come from the memory.
    samples = [passkey(random.Random(seed), 1024, depth=0.2) for seed in range(3)]
    with running_server(tmp_path, {}) as srv:
        oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)
        model = oai.models.list().data[0].id
        assert model == "demo-model"
        for s in samples:
            out = oai.completions.create(model=model, prompt=s.prompt, max_tokens=8, temperature=0)
            assert first_number(out.choices[0].text) == s.value, (s.value, out.choices[0].text)
