"""The playground's "Try the memory" panel: a long document of prose with facts hidden in it, and
the attention-only baseline's answers to set beside the served model's (training/demo.py; ``atlas
demo`` is the same on the command line).

A document is a function of (task, length, seed, prose), so the server never keeps one: the page
ingests what ``/document`` gave it into a session of its own and asks the facts itself, and
``/baseline`` builds the same document again for the baseline. Building and reading take CPU time:
they run in worker threads, never on the event loop.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from atlas.engine import Atlas
from atlas.engine.api import BUNDLED_CHECKPOINT
from atlas.engine.checkpoint import CheckpointError
from atlas.training.demo import (
    BASELINE_CHECKPOINT,
    DEMO_TASKS,
    MAX_DEMO_BYTES,
    DemoDocument,
    ask_all,
    demo_document,
    is_right,
    read_document,
    shortest,
)
from atlas.training.prompt import held_out_prose
from atlas.training.tasks import PROSE_TASKS

from ..dependencies import DemoBaseline, DemoBaselineDep, ServicesDep, SettingsDep, get_tenant
from ..errors import ApiError
from ..schemas import SEED_MAX, DemoAnswer, DemoFact, ErrorBody
from ..schemas import DemoBaseline as DemoBaselineOut
from ..schemas import DemoDocument as DemoDocumentOut
from ..settings import ServerSettings
from ..streaming import while_connected
from .common import Responses

log = logging.getLogger("atlas.server")

router = APIRouter(prefix="/v1/demo", tags=["demo"], dependencies=[Depends(get_tenant)])
ERRORS: Responses = {401: {"model": ErrorBody}, 422: {"model": ErrorBody}, 503: {"model": ErrorBody}}
BUILT_IN_PROSE = "the built-in passage"
SYNTHETIC_FILLER = "synthetic filler"  # passkey and multi_needle: repeated sentences, no prose

TaskQuery = Query(DEMO_TASKS[0], description=f"What to hide: one of {', '.join(DEMO_TASKS)}.")
LengthQuery = Query(16384, description="Bytes of document and first question (a byte-level model's "
                                       "tokens): from the task's shortest to ATLAS_DEMO_MAX_BYTES.")
SeedQuery = Query(0, ge=0, le=SEED_MAX, description="Which document: the facts, their places, the prose.")


def max_length(settings: ServerSettings) -> int:
    """The longest document this server builds."""
    return min(settings.demo_max_bytes, MAX_DEMO_BYTES)


def check_request(task: str, length: int, settings: ServerSettings) -> None:
    """422 invalid_request for a task the demo does not know or a length outside its range."""
    if task not in DEMO_TASKS:
        raise ApiError("invalid_request", f"task: unknown demo task {task[:100]!r}; one of "
                       f"{', '.join(DEMO_TASKS)}")
    low, high = shortest(task), max_length(settings)
    if not low <= length <= high:
        raise ApiError("invalid_request", f"length: a {task} document has {low} to {high} bytes "
                       f"on this server, not {length}")


def prose_name(task: str, settings: ServerSettings) -> str:
    """What the page shows as the text's source: the file's (or folder's) name, not its path."""
    if task not in PROSE_TASKS:
        return SYNTHETIC_FILLER
    return Path(settings.demo_prose).name if settings.demo_prose else BUILT_IN_PROSE


def build(task: str, length: int, seed: int, settings: ServerSettings) -> DemoDocument:
    """The document (blocking: run it in a thread). The prose is read once (held_out_prose caches)."""
    try:  # (the synthetic tasks read no prose, so a bad ATLAS_DEMO_PROSE does not stop them)
        use = settings.demo_prose is not None and task in PROSE_TASKS
        prose = held_out_prose(settings.demo_prose) if use else None
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise ApiError("demo_prose_invalid", f"ATLAS_DEMO_PROSE cannot be used: {e}") from e
    return demo_document(task, length, seed, prose)


@router.get("/document", response_model=DemoDocumentOut, responses=ERRORS)
async def document(settings: SettingsDep, task: str = TaskQuery, length: int = LengthQuery,
                   seed: int = SeedQuery) -> Response:
    """A document of ``length`` bytes of prose with the task's facts hidden at random places, and
    the questions about them with their true answers. The same (task, length, seed) gives the same
    document on a server with the same ATLAS_DEMO_PROSE."""
    check_request(task, length, settings)

    def body() -> bytes:  # a document of megabytes: built and serialised off the event loop
        doc = build(task, length, seed, settings)
        return DemoDocumentOut(task=task, seed=seed, length=length, document=doc.document,
                               facts=[DemoFact(question=f.question, truth=f.truth) for f in doc.facts],
                               prose=prose_name(task, settings)).model_dump_json().encode()

    return Response(await run_in_threadpool(body), media_type="application/json")


def serves_bundled(atlas: Atlas) -> bool:
    """Whether the served model is the bundled demo model (loaded from its folder)."""
    ckpt = atlas.checkpoint
    return ckpt is not None and ckpt.path.resolve() == BUNDLED_CHECKPOINT.resolve()


def baseline_path(settings: ServerSettings, atlas: Atlas, model_id: str) -> Path:
    """The baseline's checkpoint folder, or 404 baseline_unavailable saying why there is none."""
    if settings.demo_baseline is not None:
        path = Path(settings.demo_baseline)
        if not (path / "config.json").is_file():
            raise ApiError("baseline_unavailable", f"ATLAS_DEMO_BASELINE names no checkpoint folder "
                           f"({path.name}/config.json is missing)")
        return path
    if not serves_bundled(atlas):
        raise ApiError("baseline_unavailable", "the attention-only baseline is a twin of the bundled "
                       f"demo model and this server runs another one ({model_id}); ATLAS_DEMO_BASELINE "
                       "names a checkpoint to compare with")
    if not (BASELINE_CHECKPOINT / "config.json").is_file():
        raise ApiError("baseline_unavailable", "the bundled attention-only baseline is not installed "
                       "(engine/assets/demo-baseline: train it with configs/train/swa-baseline-prose.toml)")
    return BASELINE_CHECKPOINT


def load_baseline(cache: DemoBaseline, path: Path) -> Atlas:
    """The baseline model, on the CPU, loaded once (blocking: run it in a thread, under the lock)."""
    if cache.atlas is None or cache.path != path:
        try:
            cache.atlas = Atlas.load(path, device="cpu")
        except CheckpointError as e:
            raise ApiError("baseline_unavailable", f"the baseline checkpoint cannot be loaded: {e}") from e
        cache.path, cache.last = path, None
        log.info("demo baseline loaded: %s (%s)", path.name, cache.atlas.fingerprint[:12])
    return cache.atlas


def baseline_name(atlas: Atlas, path: Path) -> str:
    ckpt = atlas.checkpoint
    training = ckpt.records.get("training") if ckpt is not None else None
    name = training.get("name") if isinstance(training, dict) else None
    return name if isinstance(name, str) and name else path.name


@router.get("/baseline", response_model=DemoBaselineOut,
            responses={**ERRORS, 404: {"model": ErrorBody}})
async def baseline(request: Request, settings: SettingsDep, services: ServicesDep,
                   cache: DemoBaselineDep, task: str = TaskQuery, length: int = LengthQuery,
                   seed: int = SeedQuery) -> DemoBaselineOut:
    """The attention-only baseline's greedy answers to the facts of the same document (read on the
    server's CPU, so it takes as long as the document is long). 404 ``baseline_unavailable`` when
    there is none to compare with: the server runs another model than the bundled one and
    ATLAS_DEMO_BASELINE is unset, or the checkpoint is missing. One baseline run at a time: a
    second request waits for the first."""
    check_request(task, length, settings)
    path = baseline_path(settings, services.atlas, services.model_id)
    async with cache.lock:
        if await request.is_disconnected():  # gone while it waited: nothing to read for
            raise ApiError("client_disconnected", "the client went away")
        key = (path, settings.demo_prose, task, length, seed)

        gone = threading.Event()

        def still_wanted(done: int, total: int) -> None:
            if gone.is_set():  # the client left: the next baseline request need not wait for this
                raise ApiError("client_disconnected", "the client went away")

        def run() -> DemoBaselineOut:
            atlas = load_baseline(cache, path)
            if cache.last is not None and cache.last[0] == key:
                return cache.last[1]
            doc = build(task, length, seed, settings)
            said = ask_all(atlas, read_document(atlas, doc.document, still_wanted), doc.facts)
            out = DemoBaselineOut(model=baseline_name(atlas, path), fingerprint=atlas.fingerprint, answers=[
                DemoAnswer(question=f.question, truth=f.truth, answer=a, right=is_right(f, a))
                for f, a in zip(doc.facts, said, strict=True)])
            cache.last = (key, out)
            return out

        return await while_connected(request.receive, run_in_threadpool(run), on_gone=gone.set)
