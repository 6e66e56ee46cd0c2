"""The worker: one thread that owns the device and steps every job the runtime submits.

A step takes one chunk-aligned piece of every job with input (pieces of equal length are fed as one
batch, at most `max_batch` sessions per batch) and one token of every generating session (one decode
batch of at most `max_batch` sessions, kept stacked from step to step). Pieces end on the absolute
chunk grid, so a session's state does not depend on what it was batched with, and a long ingest never
holds the device for more than `ingest_chunks_per_step` chunks, so decoding sessions keep their pace.

A batch does not die with its worst member: when a batched feed or decode step raises (or a fed
session's logits come out non-finite), each member is stepped alone, and only those that fail alone
fail, with StateFormatError (state_corrupt) when their state holds values the model cannot step
(`check_values`), else with the original exception. The others go on as if batched without them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import torch

from ..api import Atlas, GeneratedToken
from ..sampling import logprobs_of
from ..state import MAX_STATE_ABS, SessionState, StateFormatError, check_values
from .errors import ShuttingDownError
from .jobs import GenerationJob, Job
from .settings import RuntimeSettings
from .stats import RuntimeStats

#: Bytes of logits a feed that records log-probabilities (`Job.score_from`) may hold at once: its
#: group is cut so that (sessions x tokens x vocabulary) float32 logits stay under it.
SCORE_LOGITS_BYTES = 256 << 20


def _scores(job: Job, n: int) -> bool:
    """Whether feeding the job's next `n` tokens records log-probabilities: input tokens from
    `score_from` on (never the tokens a generation sampled itself)."""
    if isinstance(job, GenerationJob) and job.last is not None:
        return False
    return job.score_from is not None and job.fed + n > job.score_from


class _DecodeBatch:
    """The generating sessions decoded together, their states stacked along the batch dimension."""

    def __init__(self) -> None:
        self.jobs: list[GenerationJob] = []
        self.state: SessionState | None = None


def _last(job: GenerationJob) -> int:
    """The token a batch member sampled last and feeds next (set before it joins)."""
    assert job.last is not None
    return job.last


def _groups(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class Worker:
    def __init__(self, atlas: Atlas, settings: RuntimeSettings, stats: RuntimeStats) -> None:
        self.atlas = atlas
        self.settings = settings
        self.stats = stats
        self.cv = threading.Condition()  # guards the jobs' shared fields and the job list
        self._jobs: list[Job] = []
        self._stop = False
        self._batch = _DecodeBatch()
        self._chunk = atlas.config.chunk_size
        self._thread = threading.Thread(target=self._run, name="atlas-worker", daemon=True)
        self._thread.start()

    # -- the asyncio side ---------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stop

    def submit(self, job: Job) -> None:
        with self.cv:
            if self._stop:
                raise ShuttingDownError("the runtime is shutting down")
            self._jobs.append(job)
            self.stats.running = len(self._jobs)
            self.cv.notify_all()

    def push(self, job: Job, ids: list[int], *, close: bool = False) -> None:
        """More input for a job; `close` says none will follow."""
        with self.cv:
            job.input.extend(ids)
            job.closed = job.closed or close
            self.cv.notify_all()

    def take_output(self, job: GenerationJob) -> list[GeneratedToken]:
        with self.cv:
            out = list(job.out)
            job.out.clear()
        return out

    def close(self) -> None:
        """Cancel every job and stop the thread once they have let go."""
        with self.cv:
            self._stop = True
            for j in self._jobs:
                j.cancelled = True
            self.cv.notify_all()
        self._thread.join(timeout=30)

    # -- the thread ---------------------------------------------------------------------------------

    def _ready(self, job: Job) -> bool:
        if job.cancelled or (job.closed and not job.input and not job.decodes):
            return True
        if job.input:
            cut = job.cut_at is not None and job.tokens < job.cut_at <= job.tokens + len(job.input)
            return cut or job.closed or len(job.input) + job.tokens % self._chunk >= self._chunk
        return job.decodes

    def _run(self) -> None:
        while True:
            with self.cv:
                while not self._stop and not any(self._ready(j) for j in self._jobs):
                    self.cv.wait(timeout=0.5)
                if self._stop and not self._jobs:
                    return
                jobs = list(self._jobs)
            try:
                self._step(jobs)
            except BaseException as e:  # a failed step fails its requests, not the runtime
                for j in jobs:
                    j.error = e
                    self._finish(j)

    def _finish(self, job: Job, reason: str | None = None) -> None:
        with self.cv:
            job.finished = True
            if isinstance(job, GenerationJob):
                job.finish_reason = job.finish_reason or reason
            if job in self._jobs:
                self._jobs.remove(job)
            self.stats.running = len(self._jobs)
        job.wake()

    def _take_piece(self, job: Job) -> list[int]:
        """The job's next piece: up to `ingest_chunks_per_step` chunks, ending on the chunk grid
        unless the input is closed (the last piece of a request may end anywhere) or the piece
        reaches the job's `cut_at` (it then ends there)."""
        b = self._chunk
        with self.cv:
            avail = len(job.input)
            if not avail:
                return []
            room = self.settings.ingest_chunks_per_step * b - job.tokens % b
            n = min(avail, room) if job.closed or avail >= room else avail - (avail + job.tokens) % b
            if job.cut_at is not None and job.tokens < job.cut_at <= job.tokens + min(avail, room):
                n = min(n, job.cut_at - job.tokens) if n > 0 else job.cut_at - job.tokens
            return [job.input.popleft() for _ in range(n)] if n > 0 else []

    def _step(self, jobs: list[Job]) -> None:
        start = time.perf_counter()
        # Pieces of equal length feed together; those that record log-probabilities apart (they
        # need the logits of every position, the others only the last).
        feeds: dict[tuple[int, bool], list[tuple[Job, list[int]]]] = {}
        decodes: list[GenerationJob] = []
        for job in jobs:
            if job.cancelled:
                self._cancel(job)
                continue
            ids = self._take_piece(job)
            if ids:
                feeds.setdefault((len(ids), _scores(job, len(ids))), []).append((job, ids))
            elif not job.input and isinstance(job, GenerationJob):
                decodes.append(job)
            elif not job.input and job.closed:
                self._finish(job)
        vocab = self.atlas.config.vocab_size
        for (length, scoring), same_length in feeds.items():
            size = self.settings.max_batch
            if scoring:
                size = max(1, min(size, SCORE_LOGITS_BYTES // (4 * length * vocab)))
            for group in _groups(same_length, size):
                self._feed([j for j, _ in group], [ids for _, ids in group])
                self.stats.ingest_tokens += sum(len(ids) for _, ids in group)
                self.stats.peak_feed_batch = max(self.stats.peak_feed_batch, len(group))
                for j, _ in group:
                    j.wake()
        decodes = [j for j in decodes if not j.finished]
        if decodes:
            self._decode(decodes)
        self.stats.steps += 1
        self.stats.step_seconds.append(time.perf_counter() - start)

    # -- failures -----------------------------------------------------------------------------------

    def _blame(self, exc: Exception, state: SessionState | None) -> BaseException:
        """The error a session that failed alone ends with: state_corrupt naming the tensor when its
        state holds values the model cannot step, else `exc` itself (a genuine bug stays visible)."""
        if state is not None:
            try:
                check_values(state.tensors, self.atlas.config.vocab_size, self._chunk)
            except StateFormatError as bad:
                bad.__cause__ = exc
                return bad
        return exc

    def _cancel(self, job: Job) -> None:
        """Finish a cancelled job at the state it has reached. A decoding session takes its own slot
        of the batch and feeds the token it sampled last (its owner was sent it), so that a committed
        exchange holds every token sent, as one that ends "length" does."""
        if isinstance(job, GenerationJob) and not job.finished:
            batch = self._batch
            row = next((i for i, j in enumerate(batch.jobs) if j is job), None)
            if row is not None and batch.state is not None:
                job.state = batch.state.select(torch.tensor([row], device=self.atlas.device))
            if job.last is not None:  # sampled and sent, never fed
                if not self._feed([job], [[job.last]]):
                    return  # failed alone, with its error
                job.last = None
        self._finish(job, "cancelled")

    def _fail(self, job: Job, exc: Exception, state: SessionState | None) -> None:
        job.error = self._blame(exc, state)
        self._finish(job)

    # -- feeding ------------------------------------------------------------------------------------

    def _feed(self, jobs: Sequence[Job], ids: list[list[int]]) -> list[Job]:
        """Feed each job its piece, batched; on a failure, each alone. Returns the jobs fed (the
        others are finished with their error)."""
        try:
            self._feed_batch(jobs, ids)
            return list(jobs)
        except Exception as e:
            if len(jobs) == 1:
                self._fail(jobs[0], e, jobs[0].state)
                return []
        fed = []
        for j, piece in zip(jobs, ids, strict=True):
            try:
                self._feed_batch([j], [piece])
                fed.append(j)
            except Exception as e:
                self._fail(j, e, j.state)
        return fed

    def _feed_batch(self, jobs: Sequence[Job], ids: list[list[int]]) -> None:
        before = jobs[0].state if len(jobs) == 1 else SessionState.stack(j.state for j in jobs)
        scoring = any(_scores(j, len(piece)) for j, piece in zip(jobs, ids, strict=True))
        state, logits = self.atlas.feed(before, ids, all_logits=scoring)
        # A corrupt state need not raise: it may only give non-finite logits (one pass over (B, V)).
        if not bool((logits.abs() <= MAX_STATE_ABS).all()):
            raise StateFormatError("feeding the session gave non-finite logits: its state is corrupt")
        for i, j in enumerate(jobs):
            if scoring and _scores(j, len(ids[i])):
                self._score(j, ids[i], before.last_logits[i], logits[i])
            j.state = state if len(jobs) == 1 else state[i]
            j.tokens += len(ids[i])
            j.fed += len(ids[i])
            if j.tokens == j.cut_at:
                j.cut_state = j.state

    def _score(self, job: Job, piece: list[int], last: torch.Tensor, logits: torch.Tensor) -> None:
        """Log-probabilities of the piece's tokens from `score_from` on: token k under the logits
        after token k - 1 (the piece's own, or the state's last logits for its first token), which
        are the logits a generation would sample from there. A stream's first token has none."""
        assert job.score_from is not None
        start = max(0, job.score_from - job.fed)
        before = torch.cat([last[None].to(logits.dtype), logits[:-1]])[start:]
        entries: list = list(logprobs_of(before, piece[start:], job.score_top))
        if start == 0 and job.tokens == 0 and entries:
            entries[0] = None
        with self.cv:
            job.scored.extend(entries)

    # -- decoding -----------------------------------------------------------------------------------

    def _decode(self, jobs: list[GenerationJob]) -> None:
        """One token for every session in the decode batch. Members stay stacked from step to step
        (the one-row decode path shares the big state tensors instead of copying them); a member
        whose token completes its chunk is committed through the block path and written back into
        its own slot. Sessions join once, after their prompt, while there is room (`max_batch`),
        and leave by copying their slot out."""
        self._drop_finished()
        self._admit_to_batch(jobs)
        batch = self._batch
        if not batch.jobs or batch.state is None:
            return
        new: SessionState | None
        try:
            new = self._decode_rows(batch.state, batch.jobs)
        except Exception:  # some member cannot be stepped: step each alone, drop those that fail
            new = self._decode_alone()
        if new is None:
            return
        batch.state = new
        for j in batch.jobs:
            j.tokens += 1
        self.stats.decode_tokens += len(batch.jobs)
        self.stats.peak_decode_batch = max(self.stats.peak_decode_batch, len(batch.jobs))
        self._after_feed(batch.jobs, [new] * len(batch.jobs), slots=True)

    def _decode_rows(self, st: SessionState, jobs: list[GenerationJob]) -> SessionState:
        """One token for each of `jobs` (the rows of `st`); a row whose token completes its chunk is
        committed through the block path and written back into its slot."""
        b = self._chunk
        tokens = [_last(j) for j in jobs]
        new, _ = self.atlas.decode_step(st, tokens)
        completing = [i for i, j in enumerate(jobs) if j.tokens % b == b - 1]
        if completing:
            idx = torch.tensor(completing, dtype=torch.long, device=self.atlas.device)
            committed, _ = self.atlas.feed(st.select(idx), [[tokens[i]] for i in completing])
            for k, v in new.tensors.items():
                v.index_copy_(0, idx, committed.tensors[k])
        return new

    def _decode_alone(self) -> SessionState | None:
        """The decode batch's step raised: step each member alone; those that fail alone leave the
        batch, finished with their error. The new state of the others (None if none is left)."""
        batch = self._batch
        assert batch.state is not None
        rows, kept = [], []
        for i, j in enumerate(batch.jobs):
            row = batch.state.select(torch.tensor([i], dtype=torch.long, device=self.atlas.device))
            try:
                rows.append(self._decode_rows(row, [j]))
                kept.append(j)
            except Exception as e:
                self._fail(j, e, row)
        batch.jobs = kept
        batch.state = SessionState.stack(rows) if rows else None
        return batch.state

    def _drop_finished(self) -> None:
        batch = self._batch
        kept = [i for i, j in enumerate(batch.jobs) if not j.finished]
        if len(kept) != len(batch.jobs):
            idx = torch.tensor(kept, dtype=torch.long, device=self.atlas.device)
            batch.state = batch.state.select(idx) if kept and batch.state is not None else None
            batch.jobs = [batch.jobs[i] for i in kept]

    def _admit_to_batch(self, jobs: list[GenerationJob]) -> None:
        """Sample the first token of sessions whose prompt is fed, and stack them into the batch."""
        batch = self._batch
        members = {id(j) for j in batch.jobs}
        newcomers = [j for j in jobs if id(j) not in members and not j.finished]
        for j in newcomers:
            if j.last is None:
                self._sample(j, j.state.last_logits[0])
        room = self.settings.max_batch - len(batch.jobs)
        joining = [j for j in newcomers if j.last is not None and not j.finished][:max(0, room)]
        stale = [j for j in joining if not j.state.cache_valid]
        if stale:  # e.g. a stored session decoded without a prompt: recompute its chunk first
            fed = self._feed(stale, [[_last(j)] for j in stale])
            ok = [j for j in stale if j in fed]
            self.stats.decode_tokens += len(ok)
            self._after_feed(ok, [j.state for j in ok])
        joining = [j for j in joining if j not in stale and not j.finished]
        if joining:
            parts = ([batch.state] if batch.state is not None else []) + [j.state for j in joining]
            batch.state = SessionState.stack(parts)
            batch.jobs += joining

    def _after_feed(self, jobs: list[GenerationJob], states: list[SessionState], slots: bool = False) -> None:
        for i, j in enumerate(jobs):
            row = i if slots else 0
            if j.stopped or j.generated >= j.params.max_tokens or j.timed_out:
                if slots:  # its own copy: the slot will be reused
                    j.state = states[i].select(torch.tensor([row], device=self.atlas.device))
                self._finish(j, "stop" if j.stopped else "length" if j.generated >= j.params.max_tokens
                             else "timeout")
            else:
                self._sample(j, states[i].last_logits[row])

    def _sample(self, j: GenerationJob, logits: torch.Tensor) -> None:
        p = j.params
        if j.generated >= p.max_tokens:
            self._finish(j, "length")
            return
        try:
            tok, logprob = j.sampler.sample(logits)
        except Exception as e:  # non-finite logits (a corrupt state): this session fails alone
            self._fail(j, e, None)
            return
        j.generated += 1
        j.ended = tok in j.eos  # an end-of-sequence token shows no text
        j.timed_out = j.deadline is not None and time.monotonic() >= j.deadline
        end = j.ended or j.generated >= p.max_tokens or j.timed_out
        text = j.stops.push(("" if j.ended else j.decoder.push(tok)) + (j.decoder.flush() if end else ""))
        if end or j.stops.stopped:
            text += j.stops.flush()
        with self.cv:
            j.out.append(GeneratedToken(tok, text, j.index, logprob))
        j.last = tok
        j.wake()


__all__ = ["Worker"]
