"""The web playground in a real headless Chromium (Debian's package, driven by Playwright).

It loads ``/`` without a key, stores the key, creates a session, uploads a file and watches the
progress reach 100%, then asks a question and watches the answer stream. It downloads a session as a
file and uploads it again (the new session is the same one), and shows a damaged file's refusal.
"Try the memory" builds a document with a pass key in it, reads it into a new session with the
bundled model and shows the model's answer beside the truth and the baseline's (none, then one).
Screenshots go to test-artifacts/. Skipped when chromium or playwright is not installed.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from atlas.engine import Atlas, save_checkpoint
from atlas.training.demo import demo_document

from .helpers import document, tiny_config
from .server_helpers import running_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
KEY = "k-play"

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not Path(CHROMIUM).exists():
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def server(fast_checkpoint, tmp_path_factory):
    work = tmp_path_factory.mktemp("playground")
    with running_server(work, {"ATLAS_MODEL": str(fast_checkpoint), "ATLAS_API_KEYS": f"{KEY}:play",
                               "ATLAS_PROGRESS_INTERVAL_S": "0"}, graceful=False) as srv:
        yield srv


def test_page_is_open_but_the_api_is_not(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "ATLAS playground" in page.text
    assert "://" not in page.text and "<script src" not in page.text  # nothing fetched from elsewhere
    assert httpx.get(server.url + "/v1/sessions").status_code == 401


def signed_in(browser: Any, url: str, **page_options: Any) -> Any:
    """A new page of the playground at `url` with the API key typed in (kept in localStorage)."""
    page = browser.new_page(**page_options)
    page.goto(url + "/")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    return page


def test_upload_progress_and_streamed_answer(server, tmp_path):
    doc = tmp_path / "book.txt"
    doc.write_bytes(document(400_000))
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = signed_in(browser, server.url, viewport={"width": 1200, "height": 800})
            assert page.evaluate("localStorage.getItem('atlas.apiKey')") == KEY
            page.click("#new-session")
            page.wait_for_function("document.getElementById('session-select').value.length > 0")
            sid = page.eval_on_selector("#session-select", "e => e.value")
            seen: set[str] = set()
            page.set_input_files("#file-input", str(doc))
            deadline = time.monotonic() + 60  # generous: CI shares 2 cores with the server
            while time.monotonic() < deadline:
                seen.add(page.inner_text("#progress-text"))
                if "100%" in seen and page.inner_text("#info-bytes") == "400,000":
                    break
                page.wait_for_timeout(20)
            assert "100%" in seen and page.inner_text("#info-bytes") == "400,000", seen
            page.fill("#question", "\nROMEO:")
            page.fill("#max-tokens", "40")
            page.fill("#temperature", "0")
            page.click("#ask")
            page.wait_for_function("document.getElementById('answer').dataset.done === '1'", timeout=30_000)
            answer = page.inner_text("#answer")
            assert "40 tokens" in page.inner_text("#answer-stats")
            assert page.inner_text("#error") == ""
            page.screenshot(path=str(ARTIFACTS / "playground.png"), full_page=True)
        finally:
            browser.close()
    h = {"Authorization": f"Bearer {KEY}"}
    meta = httpx.get(f"{server.url}/v1/sessions/{sid}", headers=h).json()
    assert meta["bytes_committed"] == 400_000 and meta["tokens"] == 400_000
    r = httpx.post(f"{server.url}/v1/sessions/{sid}/generate", headers=h, timeout=60,
                   json={"prompt": "\nROMEO:", "max_tokens": 40, "temperature": 0})
    text = "".join(line for line in _texts(r.text))
    assert answer.strip() == text.strip() and answer.strip()


def _greedy(url: str, sid: str) -> str:
    r = httpx.post(f"{url}/v1/sessions/{sid}/generate", headers={"Authorization": f"Bearer {KEY}"},
                   timeout=60, json={"prompt": "\nROMEO:", "max_tokens": 16, "temperature": 0})
    return "".join(_texts(r.text))


def test_download_and_upload_a_session_file(server, tmp_path):
    h = {"Authorization": f"Bearer {KEY}"}
    sid = httpx.post(f"{server.url}/v1/sessions", headers=h).json()["id"]
    r = httpx.post(f"{server.url}/v1/sessions/{sid}/ingest", headers={**h, "Content-Type": "text/plain"},
                   content=document(20_000), timeout=60)
    assert r.status_code == 200, r.text
    labels = {"name": "travel-book", "metadata": {"project": "atlas", "n": 3}}
    assert httpx.patch(f"{server.url}/v1/sessions/{sid}", headers=h, json=labels).status_code == 200
    saved = tmp_path / "saved.atlas-session"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = signed_in(browser, server.url, accept_downloads=True)
            page.wait_for_function(f"[...document.querySelectorAll('#session-select option')]"
                                   f".some(o => o.value === '{sid}')")
            page.select_option("#session-select", sid)
            page.wait_for_function("document.getElementById('info-name')?.textContent === 'travel-book'")
            assert "travel-book" in page.inner_text(f"#session-select option[value='{sid}']")
            assert page.inner_text("#info-metadata") == "project=atlas, n=3"
            with page.expect_download() as download:
                page.click("#download-state")
            assert download.value.suggested_filename == f"{sid}.atlas-session"
            download.value.save_as(saved)
            page.set_input_files("#state-input", str(saved))
            selected = "document.getElementById('session-select').value"
            page.wait_for_function(f"{selected} && {selected} !== '{sid}'")
            new = page.eval_on_selector("#session-select", "e => e.value")
            assert page.inner_text("#info-name") == "travel-book" and page.inner_text("#error") == ""
            assert new in page.inner_text("#state-status")
            damaged = tmp_path / "damaged.atlas-session"
            data = bytearray(saved.read_bytes())
            data[-100] ^= 0xFF                                     # a byte of the state altered
            damaged.write_bytes(bytes(data))
            page.set_input_files("#state-input", str(damaged))
            page.wait_for_function("document.getElementById('error').textContent.length > 0")
            assert "invalid_session_file" in page.inner_text("#error")
            assert page.eval_on_selector("#session-select", "e => e.value") == new  # nothing was made
        finally:
            browser.close()
    assert saved.read_bytes() == httpx.get(f"{server.url}/v1/sessions/{sid}/state", headers=h).content
    a, b = (httpx.get(f"{server.url}/v1/sessions/{x}", headers=h).json() for x in (sid, new))
    keys = ("tokens", "bytes_committed", "name", "metadata")
    assert [a[k] for k in keys] == [b[k] for k in keys] == [20_000, 20_000, "travel-book", labels["metadata"]]
    assert _greedy(server.url, sid) == _greedy(server.url, new) != ""


def _texts(body: str):
    import json

    for line in body.splitlines():
        if line.startswith("data: "):
            ev = json.loads(line[6:])
            if "text" in ev:
                yield ev["text"]


def test_try_the_memory(tmp_path):
    """The bundled model (no ATLAS_MODEL) reads a 2048-token document and finds its pass key; the
    baseline column says why there is none until the checkpoint appears, then shows its answer."""
    baseline = tmp_path / "baseline"
    fact = demo_document("passkey", 2048, 0).facts[0]
    truth = fact.truth
    ARTIFACTS.mkdir(exist_ok=True)
    with running_server(tmp_path / "srv", {"ATLAS_API_KEYS": f"{KEY}:play", "ATLAS_PROGRESS_INTERVAL_S": "0",
                                           "ATLAS_DEMO_BASELINE": str(baseline)}, graceful=False) as srv, \
            sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = signed_in(browser, srv.url, viewport={"width": 1200, "height": 900})
            assert "Try the memory" in page.get_attribute("#question", "placeholder")
            page.select_option("#demo-task", "passkey")
            page.fill("#demo-length", "2048")
            page.fill("#demo-seed", "0")
            row = "#demo-table tbody tr"
            done = "document.getElementById('demo-status').dataset.done === '1'"
            page.click("#demo-run")
            page.wait_for_function(done, timeout=30_000)
            assert page.inner_text("#error") == ""
            assert page.inner_text(f"{row} .demo-truth") == truth
            assert page.inner_text(f"{row} .demo-model") == f"{truth} right"
            assert page.inner_text(f"{row} .demo-baseline") == "no baseline"
            assert "ATLAS_DEMO_BASELINE" in page.get_attribute(f"{row} .demo-baseline", "title")
            assert "bytes of synthetic filler" in page.inner_text("#demo-status")
            assert "model: 1/1 right" in page.inner_text("#demo-status")
            assert page.eval_on_selector("#demo-progress", "e => e.value") == 100
            sid = page.eval_on_selector("#session-select", "e => e.value")
            assert page.inner_text("#info-name") == "demo: passkey 2048"
            assert page.inner_text("#info-bytes") == f"{2048 - len(fact.question):,}"  # the document
            # the checkpoint appears (a tiny attention-only model): the next run has its answers
            model = Atlas.from_config(tiny_config(layers=["swa"]), device="cpu", dtype=torch.float32).model
            save_checkpoint(model, baseline)
            page.click("#demo-run")
            page.wait_for_function(done, timeout=30_000)
            cell = page.inner_text(f"{row} .demo-baseline")
            assert cell.endswith((" right", " wrong")), cell
            assert "right (baseline)" in page.inner_text("#demo-status")  # the checkpoint's name
            assert page.eval_on_selector("#session-select", "e => e.value") != sid  # a new session
            page.screenshot(path=str(ARTIFACTS / "playground-demo.png"), full_page=True)
        finally:
            browser.close()
