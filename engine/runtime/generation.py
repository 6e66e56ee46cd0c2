"""One generation request: a prompt fed into a state, then tokens sampled until a stop (a stop
string, an end-of-sequence token of the model, `max_tokens`), for each of its `n` choices.

One choice is one job that feeds the prompt and then decodes. Several are forks of one prompt
state: a feed-only job reads the prompt once, then `n` jobs start from its state (states are
values: the fork is free), each with its own sampler (seed + index), and the worker decodes them in
its one decode batch. When the params ask for the prompt's log-probabilities, the worker records
them while it feeds, and they go out as one `PromptLogprobs` event before any token.

The task relays the tokens the worker samples as they come; it ends with a `GenerationDone` that
carries the state after the exchange (the caller decides whether to commit it).
"""

from __future__ import annotations

import asyncio

from ..api import Atlas
from ..sampling import SamplingParams
from ..state import SessionState
from .jobs import Control, GenerationDone, GenerationJob, Job, PromptLogprobs
from .worker import Worker


class GenerationTask:
    def __init__(self, state: SessionState, prompt: list[int], params: SamplingParams, *, atlas: Atlas,
                 worker: Worker, events: asyncio.Queue, control: Control,
                 document: list[int] | None = None, deadline: float | None = None) -> None:
        self.state = state
        self.prompt = prompt
        self.document = document or []  # the held-back end of the session's document, fed first
        self.params = params
        self.atlas = atlas
        self.worker = worker
        self.events = events
        self.control = control
        self.deadline = deadline  # time.monotonic(): GenerationJob.deadline
        self._changed = asyncio.Event()  # set by the worker when any of this request's jobs moves

    def _choice(self, state: SessionState, prompt: list[int], index: int) -> GenerationJob:
        return GenerationJob(state, prompt, self.params, self.atlas.tokenizer, self.atlas.eos_token_ids,
                             vocab_size=self.atlas.config.vocab_size, index=index,
                             sampler_prompt=self.prompt, changed=self._changed, deadline=self.deadline)

    def _score(self, job: Job) -> None:
        if self.params.prompt_logprobs is not None:
            job.score_from, job.score_top = len(self.document), self.params.prompt_logprobs

    async def _wait(self) -> None:
        await self._changed.wait()
        self._changed.clear()

    async def run(self) -> GenerationDone:
        """Stream the tokens into `events`; the final `GenerationDone` is returned, not sent."""
        fed = self.document + self.prompt
        if self.params.n == 1:
            jobs = [self._choice(self.state, fed, 0)]
            self._score(jobs[0])
        else:
            state = self.state
            if fed:  # read the prompt once; the n choices fork its state
                prefill = Job(state, changed=self._changed)
                prefill.input.extend(fed)
                prefill.closed = True
                self._score(prefill)
                self.control.attach(prefill)
                self.worker.submit(prefill)
                while not prefill.finished:
                    await self._wait()
                if prefill.error is not None:
                    raise prefill.error
                if prefill.cancelled:
                    n = self.params.n
                    return GenerationDone("cancelled", len(self.prompt), 0, finish_reasons=["cancelled"] * n)
                state = prefill.state
                self._send_scores(prefill)
            jobs = [self._choice(state, [], i) for i in range(self.params.n)]
        for job in jobs:
            self.control.attach(job)
            self.worker.submit(job)
        scoring = jobs[0] if self.params.n == 1 and self.params.prompt_logprobs is not None else None
        while True:
            await self._wait()
            if scoring is not None and (scoring.fed >= len(fed) or scoring.finished):
                self._send_scores(scoring)  # the prompt is read: its scores come before any token
                scoring = None
            for job in jobs:
                for tok in self.worker.take_output(job):
                    self.events.put_nowait(tok)
            for job in jobs:
                if job.error is not None:
                    raise job.error
            if all(job.finished for job in jobs):
                reasons = [job.finish_reason or "length" for job in jobs]
                return GenerationDone(reasons[0], len(self.prompt), sum(job.generated for job in jobs),
                                      state=jobs[0].state, finish_reasons=reasons)

    def _send_scores(self, job: Job) -> None:
        if self.params.prompt_logprobs is None:
            return
        with self.worker.cv:
            entries = list(job.scored)
        self.events.put_nowait(PromptLogprobs(entries))


__all__ = ["GenerationTask"]
