"""The client commands of ``atlas`` (ingest, ask, chat, fork, sessions: list, set, export, import, rm).

They live here, not in the server, so that the client distribution works without torch or FastAPI:
``atlas.server.cli`` adds them to ``atlas`` with ``register(app)``, and installed alone the same
commands are ``atlas-client``. Results go to stdout (ids, answers, tables), progress and errors to
stderr, so scripts can capture one and show the other.

Exit codes: 0 ok; 1 any other error (server error, bad request); 2 bad command line; 3 not found;
4 conflict (offset gap, lease held, unusable state); 5 server unreachable; 6 unauthorized (API key);
7 server busy (429/503 after retries).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from ._core import DEFAULT_URL, KEEP
from .client import AtlasClient
from .errors import AtlasError, Busy, Conflict, NotFound, Unauthorized, Unreachable
from .models import IngestProgress, MetadataValue, Session

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
        err.print(f"[red]error[/red] {e.status or ''} {e.code}: {escape(e.message)}".replace("  ", " "),
                  highlight=False)
        raise typer.Exit(exit_code(e)) from None


def ingest(
    file: Annotated[str, typer.Argument(help="Text file to stream in ('-' reads stdin)")],
    session: Annotated[str | None, typer.Option("--session", "-s",
                                                help="Session id (default: a new one)")] = None,
    append: Annotated[bool, typer.Option(
        "--append", help="Start after what the session already has "
        "(default: FILE is the document from its start; a rerun resumes)")] = False,
    start: Annotated[int | None, typer.Option(
        "--start", min=0, help="The document offset where FILE begins: how a failed --append resumes "
        "(it prints the command); default 0")] = None,
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
    if append and start is not None:
        err.print("[red]error[/red] --append or --start, not both")
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

            # where FILE begins in the document: fixed now, so that the resume command can say it
            begin = start or 0
            if append and session is not None:
                begin = c.get_session(sid).bytes_committed
            try:
                last = c.ingest(source, sid, start=begin, on_progress=show)
            except AtlasError:
                err.print(f"resume with: atlas ingest {file} --session {sid}"
                          + (f" --start {begin}" if begin else ""))
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


def _turns(interactive: bool) -> Iterator[str]:
    """The user's lines, one turn each, until end of input (or /exit, /quit at a terminal). At a
    terminal a prompt goes to stderr first; piped lines are read as they come, blank ones skipped."""
    while True:
        if interactive:
            err.print("[bold cyan]you>[/bold cyan] ", end="")
        line = sys.stdin.readline()
        if not line:
            return
        line = line.rstrip("\r\n")
        if interactive and line.strip() in ("/exit", "/quit"):
            return
        if line.strip():
            yield line


def chat(
    session: Annotated[str | None, typer.Argument(
        help="Session id: the conversation is read after its document (default: no document)",
        show_default=False)] = None,
    system: Annotated[str | None, typer.Option("--system",
                                               help="System message before the conversation")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", help="Tokens per answer")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0: greedy")] = 0.7,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (reproducible answers)")] = None,
    commit: Annotated[bool, typer.Option("--commit", help=(
        "Append each turn and its answer to the session (default: the session stays as it is, "
        "every turn runs on a fork)"))] = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, retries: Retries = 5,
) -> None:
    """Chat with a session: each line read from stdin is a turn (a terminal, or a pipe:
    printf 'hi\\nbye\\n' | atlas chat SID); answers stream to stdout, one per line."""
    if commit and session is None:
        raise typer.BadParameter("--commit needs a session to append the turns to", param_hint="--commit")
    interactive = sys.stdin.isatty()
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    # With --commit the session holds the turns sent so far: only the new ones go with each request
    # (sending all again would append them twice). Without it, every request carries the whole
    # conversation, read on a fresh fork of the session.
    sent = 0
    with _client(url, api_key, retries) as c:
        for line in _turns(interactive):
            history.append({"role": "user", "content": line})
            stream = c.chat(history[sent:] if commit else history, session_id=session, commit=commit,
                            max_tokens=max_tokens, temperature=temperature, seed=seed)
            answer: list[str] = []
            try:
                for tok in stream:
                    answer.append(tok.text)
                    sys.stdout.write(tok.text)
                    sys.stdout.flush()
            finally:
                stream.close()
                sys.stdout.write("\n")
                sys.stdout.flush()
            history.append({"role": "assistant", "content": "".join(answer)})
            sent = len(history)
            if stream.done and stream.done.finish_reason == "timeout":
                err.print("[yellow]the server's time limit stopped the answer[/yellow]")


def fork(
    session: Annotated[str, typer.Argument(help="Session id")],
    url: Url = DEFAULT_URL, api_key: ApiKey = None, retries: Retries = 5,
) -> None:
    """Copy a session (cheap: copy-on-write); prints the new id."""
    with _client(url, api_key, retries) as c:
        typer.echo(c.fork(session).id)


sessions_app = typer.Typer(help="Your sessions (a table); set their name, metadata and TTL; export one "
                           "as a file and import it here or on another server; remove them.",
                           invoke_without_command=True, no_args_is_help=False)

Meta = Annotated[list[str] | None, typer.Option("--meta", metavar="KEY=VALUE", show_default=False,
                                                 help="Metadata item (repeatable)")]


def _items(pairs: list[str] | None, option: str) -> dict[str, MetadataValue]:
    """``KEY=VALUE`` options as a mapping; values stay strings (a filter matches them as typed)."""
    items: dict[str, MetadataValue] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint=option)
        items[key] = value
    return items


def _labels(s: Session) -> str:
    """A session's metadata as one cell: ``k=v, k=v`` (values other than strings as JSON)."""
    return ", ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in s.metadata.items())


def _expiry(s: Session) -> str:
    return "" if s.ttl_s is None else f"{s.ttl_s:,} s" + (" sliding" if s.sliding_ttl else "")


@sessions_app.callback(invoke_without_command=True)
def sessions(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
    name: Annotated[str | None, typer.Option("--name", help="Only sessions of this name")] = None,
    meta: Meta = None,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, retries: Retries = 5,
) -> None:
    """Your sessions: id, name, tokens, bytes, state size, last update, TTL, metadata. A session
    whose stored metadata is damaged is marked broken (it serves nothing; rm removes it)."""
    if ctx.invoked_subcommand is not None:
        return
    wanted = _items(meta, "--meta")
    with _client(url, api_key, retries) as c:
        rows = c.list_sessions(name=name, metadata=wanted or None)
    if json_out:
        for s in rows:
            typer.echo(s.model_dump_json())
        return
    # ids whole on one line (scripts grep them); long names and metadata wrap instead
    table = Table(Column("id", no_wrap=True), "name", "tokens", "bytes", "state", "updated", "ttl",
                  "metadata", "forked from")
    for s in rows:
        # a broken session's counters and labels are not to be trusted: the row says why instead
        labels = f"[red]broken: {escape(s.broken)}[/red]" if s.broken else escape(_labels(s))
        table.add_row(s.id + (" [red]broken[/red]" if s.broken else ""), escape(s.name or ""),
                      f"{s.tokens:,}", f"{s.bytes_committed:,}", f"{s.state_bytes:,}",
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.updated)), _expiry(s), labels,
                      s.forked_from or "")
    Console(width=200).print(table)


@sessions_app.command("set")
def sessions_set(
    session: Annotated[str, typer.Argument(help="Session id")],
    name: Annotated[str | None, typer.Option("--name", help="Name the session")] = None,
    no_name: Annotated[bool, typer.Option("--no-name", help="Remove its name")] = False,
    ttl: Annotated[int | None, typer.Option("--ttl", min=1, help="Expire after N seconds (from now)")] = None,
    no_ttl: Annotated[bool, typer.Option("--no-ttl", help="Never expire")] = False,
    sliding: Annotated[bool | None, typer.Option("--sliding/--no-sliding", show_default=False, help=(
        "Every request on the session restarts its TTL (or not)"))] = None,
    meta: Meta = None,
    clear_meta: Annotated[bool, typer.Option("--clear-meta", help=(
        "Drop the metadata it has (with --meta: keep only those items)"))] = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, retries: Retries = 5,
) -> None:
    """Change a session's name, TTL and metadata; what is not given stays. --meta adds or replaces
    items of the metadata it has."""
    if name is not None and no_name:
        raise typer.BadParameter("--name and --no-name exclude each other", param_hint="--name")
    if ttl is not None and no_ttl:
        raise typer.BadParameter("--ttl and --no-ttl exclude each other", param_hint="--ttl")
    items = _items(meta, "--meta")
    if name is None and not no_name and ttl is None and not no_ttl and sliding is None and not items \
            and not clear_meta:
        raise typer.BadParameter("nothing to change: give --name, --ttl, --sliding, --meta, ...")
    with _client(url, api_key, retries) as c:
        # The server replaces metadata whole: --meta without --clear-meta merges into what it has.
        metadata = items if clear_meta else ({**c.get_session(session).metadata, **items} if items else KEEP)
        s = c.update_session(session, name=None if no_name else KEEP if name is None else name,
                             ttl_s=None if no_ttl else KEEP if ttl is None else ttl,
                             sliding_ttl=KEEP if sliding is None else sliding, metadata=metadata)
    err.print(f"session {s.id}: name {s.name!r}, ttl {_expiry(s) or 'none'}, metadata {{{_labels(s)}}}",
              highlight=False, markup=False)


@sessions_app.command("export")
def sessions_export(
    session: Annotated[str, typer.Argument(help="Session id")],
    output: Annotated[str | None, typer.Option("--output", "-o", show_default=False, help=(
        "File to write ('-': stdout); default ID.atlas-session here"))] = None,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, retries: Retries = 5,
) -> None:
    """Save a session (its state, counters, name, metadata) as one file, for sessions import here
    or on another server running the same model."""
    target = output or f"{session}.atlas-session"
    if target != "-" and (Path(target).is_dir() or not Path(target).absolute().parent.is_dir()):
        err.print(f"[red]error[/red] cannot write {target}: "
                  + ("it is a folder" if Path(target).is_dir() else "its folder does not exist"))
        raise typer.Exit(EXIT_USAGE)
    with _client(url, api_key, retries) as c:
        if target == "-":
            written = c.export_state(session, sys.stdout.buffer)
            sys.stdout.buffer.flush()
        else:
            written = c.export_state(session, target)
    err.print(f"session {session}: {written:,} bytes to {'stdout' if target == '-' else target}",
              highlight=False, markup=False)


@sessions_app.command("import")
def sessions_import(
    file: Annotated[str, typer.Argument(help="Session file (sessions export); '-' reads stdin")],
    ttl: Annotated[int | None, typer.Option("--ttl", min=1, help="Expire after N seconds")] = None,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, retries: Retries = 5,
) -> None:
    """Make a new session from a session file; prints its id. It is the exported session again,
    down to the next token it generates."""
    if file != "-" and not Path(file).is_file():
        err.print(f"[red]error[/red] no such file: {file}")
        raise typer.Exit(EXIT_USAGE)
    source: Any = sys.stdin.buffer if file == "-" else Path(file)
    with _client(url, api_key, retries) as c:
        s = c.import_state(source, ttl_s=ttl)
    typer.echo(s.id)
    err.print(f"session {s.id}: {s.tokens:,} tokens, {s.bytes_committed:,} bytes committed"
              + (f", name {s.name!r}" if s.name else ""), highlight=False, markup=False)


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
    commands: list[Callable[..., None]] = [ingest, ask, chat, fork]
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
