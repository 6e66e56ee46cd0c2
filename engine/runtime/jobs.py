"""What the worker thread and the asyncio side share: jobs, their cancellation handle, and the events
a request streams back.

A job is the work of one request. The asyncio side fills its input and waits on it; the worker
advances its state. Fields the two both touch are guarded by the worker's condition variable; the
worker wakes the owner through the owner's event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field

from ..api import GeneratedToken
from ..sampling import Sampler, SamplingParams, StopMatcher, TokenLogprob
from ..state import SessionState
from ..store import SessionMeta
from ..tokenizer import Tokenizer


@dataclass
class IngestProgress:
    session_id: str
    bytes_committed: int  # document bytes in the session (committed to the store when done)
    tokens: int  # tokens in the session
    tokens_per_s: float  # rate of this request
    done: bool = False


@dataclass
class PromptLogprobs:
    """The log-probabilities of the prompt's tokens (SamplingParams.prompt_logprobs), sent once the
    prompt is read, before any generated token. The first is None when nothing came before it."""

    entries: list[TokenLogprob | None]


@dataclass
class GenerationDone:
    finish_reason: str  # of the first choice: "stop", "length", "timeout" or "cancelled"
    prompt_tokens: int
    completion_tokens: int  # of all choices together
    session: SessionMeta | None = None  # the session after a committed exchange
    state: SessionState | None = field(default=None, repr=False)  # the first choice's
    finish_reasons: list[str] = field(default_factory=list)  # one per choice (SamplingParams.n)


class Job:
    """Tokens to feed into one session's state. Must be created inside the owner's event loop."""

    def __init__(self, state: SessionState, *, changed: asyncio.Event | None = None) -> None:
        self.state = state
        self.tokens = state.tokens[0]  # cached: reading it from the tensor would sync the device
        self.input: deque[int] = deque()  # tokens waiting to be fed
        self.closed = False  # no more input will come
        # A token count the next piece must end at (off the chunk grid if need be): where the owner
        # wants the state, to save it (an ingest's checkpoint at a point it can map to bytes).
        self.cut_at: int | None = None
        self.cut_state: SessionState | None = None  # the state at `cut_at`, set by the worker
        self.cancelled = False
        self.finished = False
        self.error: BaseException | None = None
        # Log-probabilities of the input tokens from index `score_from` on (None: none), with
        # `score_top` alternatives each; the worker appends them to `scored` as it feeds.
        self.score_from: int | None = None
        self.score_top = 0
        self.scored: list[TokenLogprob | None] = []
        self.fed = 0  # input tokens fed so far
        self._loop = asyncio.get_running_loop()
        self._changed = changed or asyncio.Event()  # shared by the jobs of one request (n choices)

    @property
    def decodes(self) -> bool:
        """Whether the job samples tokens once its input is fed (or only feeds)."""
        return False

    def wake(self) -> None:
        """Tell the owner something changed; safe from any thread."""
        self._loop.call_soon_threadsafe(self._changed.set)

    async def changed(self) -> None:
        await self._changed.wait()
        self._changed.clear()

    async def until_finished(self) -> None:
        while not self.finished:
            await self.changed()


class GenerationJob(Job):
    """Feeds a prompt (if any), then samples one token per step until a stop, `max_tokens` or a
    cancel. Choice `index` of a request: its generator is seeded with seed + index; `sampler_prompt`
    are the ids its repetition penalty counts as the prompt's."""

    def __init__(self, state: SessionState, prompt: list[int], params: SamplingParams,
                 tokenizer: Tokenizer, eos_token_ids: tuple[int, ...] = (), *, vocab_size: int,
                 index: int = 0, sampler_prompt: list[int] | None = None,
                 changed: asyncio.Event | None = None, deadline: float | None = None) -> None:
        super().__init__(state, changed=changed)
        self.input.extend(prompt)
        self.closed = True
        self.params = params
        self.index = index
        self.sampler = Sampler(params, vocab_size, state.device,
                               prompt if sampler_prompt is None else sampler_prompt, index)
        self.decoder = tokenizer.stream_decoder()
        self.stops = StopMatcher(params.stop)
        self.eos = frozenset(eos_token_ids)  # sampling one ends the generation ("stop"), showing no text
        self.ended = False  # an end-of-sequence token was sampled
        self.out: deque[GeneratedToken] = deque()  # sampled tokens not yet taken by the owner
        self.last: int | None = None  # sampled, emitted, not yet fed
        self.generated = 0
        self.finish_reason: str | None = None
        # time.monotonic() past which no token is sampled after the next: the generation ends
        # "timeout" as it ends "length", its held-back text sent and its last token fed.
        self.deadline = deadline
        self.timed_out = False

    @property
    def decodes(self) -> bool:
        return True

    @property
    def stopped(self) -> bool:
        """A stop string or an end-of-sequence token was sampled."""
        return self.stops.stopped or self.ended


class Control:
    """The caller's handle on a running request: cancels its jobs (a generation of n choices has
    several) from the event loop, also before they exist (a caller that left while the request
    waited for its session)."""

    def __init__(self, cv: threading.Condition) -> None:
        self._cv = cv
        self.jobs: list[Job] = []
        self.cancelled = False

    def attach(self, job: Job) -> None:
        with self._cv:
            self.jobs.append(job)
            job.cancelled = self.cancelled

    def cancel(self) -> None:
        with self._cv:
            self.cancelled = True
            for job in self.jobs:
                if not job.finished:
                    job.cancelled = True
            self._cv.notify_all()


__all__ = ["Control", "GenerationDone", "GenerationJob", "IngestProgress", "Job", "PromptLogprobs"]
