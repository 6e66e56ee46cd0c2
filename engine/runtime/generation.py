"""One generation request: a prompt fed into a state, then tokens sampled until a stop (a stop
string, an end-of-sequence token of the model, `max_tokens`).

The task relays the tokens the worker samples as they come; it ends with a `GenerationDone` that
carries the state after the exchange (the caller decides whether to commit it).
"""

from __future__ import annotations

import asyncio

from ..api import Atlas
from ..sampling import SamplingParams
from ..state import SessionState
from .jobs import Control, GenerationDone, GenerationJob
from .worker import Worker


class GenerationTask:
    def __init__(self, state: SessionState, prompt: list[int], params: SamplingParams, *, atlas: Atlas,
                 worker: Worker, events: asyncio.Queue, control: Control,
                 document: list[int] | None = None) -> None:
        self.state = state
        self.prompt = prompt
        self.document = document or []  # the held-back end of the session's document, fed first
        self.params = params
        self.atlas = atlas
        self.worker = worker
        self.events = events
        self.control = control

    async def run(self) -> GenerationDone:
        """Stream the tokens into `events`; the final `GenerationDone` is returned, not sent."""
        job = GenerationJob(self.state, self.document + self.prompt, self.params, self.atlas.tokenizer,
                            self.atlas.eos_token_ids)
        self.control.attach(job)
        self.worker.submit(job)
        while True:
            await job.changed()
            for tok in self.worker.take_output(job):
                self.events.put_nowait(tok)
            if job.error is not None:
                raise job.error
            if job.finished:
                return GenerationDone(job.finish_reason or "length", len(self.prompt), job.generated,
                                      state=job.state)


__all__ = ["GenerationTask"]
