"""The client commands of ``atlas`` (ingest, ask, sessions, fork).

They live here, not in the server, so that the client distribution works without torch or FastAPI:
``atlas.server.cli`` adds them to ``atlas`` with ``register(app)``, and installed alone the same
commands are ``atlas-client``. Results go to stdout (ids, answers, tables), progress and errors to
stderr, so scripts can capture one and show the other.

Exit codes: 0 ok; 1 any other error (server error, bad request); 2 bad command line; 3 not found;
4 conflict (offset gap, lease held, unusable state); 5 server unreachable; 6 unauthorized (API key);
7 server busy (429/503 after retries).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ._core import DEFAULT_URL
from .client import AtlasClient
from .errors import AtlasError, Busy, Conflict, NotFound, Unauthorized, Unreachable
from .models import IngestProgress

EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_CONFLICT, EXIT_UNREACHABLE, EXIT_UNAUTHORIZED, EXIT_BUSY = \
    1, 2, 3, 4, 5, 6, 7
_EXIT: list[tuple[type[AtlasError], int]] = [
    (NotFound, EXIT_NOT_FOUND), (Conflict, EXIT_CONFLICT), (Unreachable, EXIT_UNREACHABLE),
    (Unauthorized, EXIT_UNAUTHORIZED), (Busy, EXIT_BUSY)]

err = Console(stderr=True, soft_wrap=True)  # error lines stay whole for grep

Url = Annotated[str, typer.Option("--url", envvar="ATLAS_URL", help="Server URL (ATLAS_URL)")]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="ATLAS_API_KEY",
                                            help="API key, sent as Bearer (ATLAS_API_KEY)")]
Retries = Annotated[int, typer.Option("--retries", envvar="ATLAS_RETRIES",
                                      help="Retries on 429/503 and unreachable server (ATLAS_RETRIES)")]


def exit_code(e: AtlasError) -> int:
    """The documented exit status for an error (scripts branch on it)."""
    return next((code for cls, code in _EXIT if isinstance(e, cls)), EXIT_ERROR)


@contextmanager
def _client(url: str, api_key: str | None, retries: int) -> Iterator[AtlasClient]:
    """A client whose errors become one readable stderr line and the documented exit code."""
    try:
        with AtlasClient(url, api_key or "", retries=retries) as c:
            yield c
    except AtlasError as e:
        err.print(f"[red]error[/red] {e.status or ''} {e.code}: {e.message}".replace("  ", " "),
                  highlight=False)
        raise typer.Exit(exit_code(e)) from None


def ingest(
    file: Annotated[str, typer.Argument(help="Text file to stream in ('-' reads stdin)")],
    session: Annotated[str | None, typer.Option("--session", "-s",
                                                help="Session id (default: a new one)")] = None,
    append: Annotated[bool, typer.Option(
        "--append", help="Start after what the session already has "
        "(default: FILE is the document from its start; a rerun resumes)")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar")] = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, retries: Retries = 5,
) -> None:
    """Stream a document into a session; prints the session id on stdout. Resumes by itself after a
    dropped connection; after a failure, the same command with --session ID continues."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    if file != "-" and not Path(file).is_file():
        err.print(f"[red]error[/red] no such file: {file}")
        raise typer.Exit(EXIT_USAGE)
    source: Any = sys.stdin.buffer if file == "-" else Path(file)
    total = None if file == "-" else Path(file).stat().st_size
    with _client(url, api_key, retries) as c:
        sid = session or c.create_session().id
        typer.echo(sid)  # first, so a script has it even if the upload fails
        sys.stdout.flush()
        columns = [TextColumn("ingest"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
        with Progress(*columns, console=err, disable=quiet) as bar:
            task = bar.add_task("ingest", total=total, rate="")
            t0 = time.perf_counter()
            start_tokens: list[int] = []

            def show(p: IngestProgress) -> None:
                if not start_tokens:
                    start_tokens.append(p.tokens)
                rate = (p.tokens - start_tokens[0]) / max(1e-6, time.perf_counter() - t0)
                resumed = f" (resumed {p.resumes}x)" if p.resumes else ""
                bar.update(task, completed=p.bytes_sent, rate=f"{p.tokens:,} tok  {rate:,.0f} tok/s{resumed}")

            try:
                last = c.ingest(source, sid, start=None if append else 0, on_progress=show)
            except AtlasError:
                err.print(f"resume with: atlas ingest {file} --session {sid}")
                raise
            bar.update(task, completed=last.bytes_committed if total is None else total)
        err.print(f"session {sid}: {last.tokens:,} tokens, {last.bytes_committed:,} bytes committed")


def _prompt(prompt: str | None) -> str:
    """The prompt as given; '-', or none with stdin not a terminal, reads stdin (escapes and
    newlines stay as they are: ``printf '\\nQ: who?\\nA:' | atlas ask SID -``)."""
    if prompt == "-" or (prompt is None and not sys.stdin.isatty()):
        return sys.stdin.read()
    if prompt is None:
        raise typer.BadParameter("give a prompt, '-', or pipe one on stdin", param_hint="PROMPT")
    return prompt


def ask(
    session: Annotated[str, typer.Argument(help="Session id")],
    prompt: Annotated[str | None, typer.Argument(
        help="Prompt read after the session's document; '-' (or none, with stdin piped) reads stdin",
        show_default=False)] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Tokens to generate")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0: greedy")] = 0.7,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (reproducible answers)")] = None,
    commit: Annotated[bool, typer.Option("--commit",
                                         help="Append question and answer to the session")] = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, retries: Retries = 5,
) -> None:
    """Ask a session a question; the answer streams to stdout as it is generated."""
    text = _prompt(prompt)
    with _client(url, api_key, retries) as c:
        stream = c.generate(session, text, max_tokens=max_tokens, temperature=temperature, seed=seed,
                            commit=commit)
        for tok in stream:
            sys.stdout.write(tok.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if stream.done and stream.done.finish_reason == "timeout":
            err.print("[yellow]the server's time limit stopped the answer[/yellow]")


def fork(
    session: Annotated[str, typer.Argument(help="Session id")],
    url: Url = DEFAULT_URL, api_key: ApiKey = None, retries: Retries = 5,
) -> None:
    """Copy a session (cheap: copy-on-write); prints the new id."""
    with _client(url, api_key, retries) as c:
        typer.echo(c.fork(session).id)


sessions_app = typer.Typer(help="List sessions (a table), or remove one: sessions rm ID.",
                           invoke_without_command=True, no_args_is_help=False)


@sessions_app.callback(invoke_without_command=True)
def sessions(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, retries: Retries = 5,
) -> None:
    """Your sessions: id, tokens, bytes, state size, last update."""
    if ctx.invoked_subcommand is not None:
        return
    with _client(url, api_key, retries) as c:
        rows = c.list_sessions()
    if json_out:
        for s in rows:
            typer.echo(s.model_dump_json())
        return
    table = Table("id", "tokens", "bytes", "state", "updated", "forked from")
    for s in rows:
        table.add_row(s.id, f"{s.tokens:,}", f"{s.bytes_committed:,}", f"{s.state_bytes:,}",
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.updated)), s.forked_from or "")
    Console(width=200).print(table)


@sessions_app.command("rm")
def sessions_rm(
    session: Annotated[list[str], typer.Argument(help="Session id(s)")],
    url: Url = DEFAULT_URL, api_key: ApiKey = None, retries: Retries = 5,
) -> None:
    """Delete sessions."""
    with _client(url, api_key, retries) as c:
        for sid in session:
            c.delete_session(sid)
            err.print(f"deleted {sid}")


def register(app: typer.Typer) -> None:
    """Add the client commands to a typer app (the server's ``atlas`` uses this)."""
    commands: list[Callable[..., None]] = [ingest, ask, fork]
    for fn in commands:
        app.command()(fn)
    app.add_typer(sessions_app, name="sessions")


app = typer.Typer(help="ATLAS client: stream documents into sessions and ask them questions.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """ATLAS client: stream documents into sessions and ask them questions (exit codes: see module doc)."""


register(app)

if __name__ == "__main__":
    app()
