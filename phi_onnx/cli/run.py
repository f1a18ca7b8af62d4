"""The `phi-onnx chat`, `generate` and `bench` commands (added to the CLI group in phi_onnx/cli/__init__.py)."""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Callable
from typing import Any, TypeVar

import click

from phi_onnx.cli.errors import cli_wording, user_errors
from phi_onnx.cli.options import THREADS, FiniteFloat, generation_kwargs, generation_options
from phi_onnx.errors import OptionsError, PhiOnnxError
from phi_onnx.export.options import PRECISIONS

F = TypeVar("F", bound=Callable[..., Any])

CHAT_HELP = ("Commands: /reset (forget the conversation), /system TEXT (set the system prompt), /help, "
             "/exit.")
COMMANDS = ["/reset", "/system", "/help", "/exit"]
#: What the line editor adds, said in the banner and by /help on a terminal.
EDITOR_HELP = "Alt+Enter starts a new line; a pasted block is one message; Up/Down recall earlier ones."
NOT_UTF8 = "is not valid UTF-8 text"


_user_errors = user_errors(interrupted="")  # Ctrl-C during a reply is handled inside chat

_JSON_SCHEMA = click.option(
    "--json-schema", "json_schema_file", type=click.Path(dir_okay=False), default=None, metavar="FILE",
    help="Constrain the reply to JSON valid against this JSON Schema file (constrained decoding).")


def _read_schema(path: str | None) -> Any:
    """The JSON of --json-schema FILE (None without it); OptionsError naming the file when it is unusable."""
    if path is None:
        return None
    try:
        text = open(path, encoding="utf-8").read()  # noqa: SIM115 - read at once
    except (OSError, UnicodeDecodeError) as error:
        raise OptionsError(f"Cannot read the JSON schema {path}: {getattr(error, 'strerror', None) or error}.",
                           hint="Pass a UTF-8 JSON file, e.g. --json-schema person.schema.json.") from error
    try:
        schema = json.loads(text)
    except ValueError as error:
        raise OptionsError(f"The JSON schema {path} is not valid JSON ({error}).",
                           hint='Write a schema such as {"type": "object", "properties": {...}}.') from error
    from phi_onnx.runtime.grammar import json_schema

    json_schema(schema)  # an unenforceable schema fails now, before the (slow) load
    return schema


def _model_options(func: F) -> F:
    func = click.option("--revision", default=None,
                        help="Hub revision (branch, tag or commit) when MODEL is a hub id.")(func)
    func = click.option("--precision", type=click.Choice(PRECISIONS), default=None,
                        help="When MODEL is not an export folder: the precision to export it in "
                             "(default int4).")(func)
    func = click.option("--threads", type=THREADS, default=None,
                        help="Intra-op threads (default: one per physical core).")(func)
    func = click.option("--backend", type=click.Choice(["auto", "genai", "ort"]), default="auto", show_default=True,
                        help="onnxruntime-genai, or phi-onnx's own loop on plain onnxruntime.")(func)
    func = click.option("--device", default="auto", show_default=True,
                        help="auto, cpu, cuda or cuda:N (auto uses CUDA only when it really works).")(func)
    return click.argument("model")(func)


def _load(model: str, device: str, backend: str, threads: int | None, precision: str | None = None,
          revision: str | None = None) -> Any:
    """Load MODEL: an export folder, or a name exported into the store on first use (see phi_onnx.store)."""
    import sys

    from phi_onnx.runtime.model import load
    from phi_onnx.store import resolve_model

    folder = resolve_model(model, device=device, precision=precision, revision=revision,
                           notify=lambda line: click.echo(line, err=True), progress=sys.stderr.isatty())
    if precision is not None and str(folder) == model:
        click.echo(f"Note: --precision applies when MODEL is a name to export; {model} is an export already.",
                   err=True)
    return load(folder, device=device, backend=backend, threads=threads)


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validate the sampling options before the (slow) load, so a typo fails at once."""
    from phi_onnx.runtime.options import GenerationOptions

    kwargs = generation_kwargs(options)
    GenerationOptions.from_kwargs(None, **kwargs)
    return kwargs


def _check_text(value: str, what: str) -> str:
    """Refuse text that arrived as bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    if any("\udc80" <= char <= "\udcff" for char in value):
        raise TextError(f"{what} {NOT_UTF8}.", hint="Pass UTF-8 text (check the terminal's or file's encoding).")
    return value


def _read_stdin(what: str) -> str:
    """All of stdin, decoded as UTF-8 (a leading byte order mark is dropped)."""
    data = click.get_binary_stream("stdin").read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise TextError(f"{what} {NOT_UTF8} (byte {error.start}: {data[error.start:error.start + 1]!r}).",
                        hint="Convert it first, e.g. `iconv -f LATIN1 -t UTF-8 FILE | phi-onnx ...`.") from None


class TextError(PhiOnnxError):
    """Text from the command line or stdin is not UTF-8."""


def _stats(result: Any) -> str:
    speed = f", {result.decode_tokens_per_second:.1f} tokens/s" if result.new_tokens > 1 else ""
    cached = f", {result.cached_tokens} cached" if result.cached_tokens else ""
    return (f"[{result.new_tokens} tokens{speed}, first token {result.first_token_seconds * 1000:.0f} ms, "
            f"prompt {result.prompt_tokens}{cached}, {result.provider} / {result.backend}, {result.finish_reason}]")


@click.command()
@_model_options
@click.argument("prompt")
@generation_options(default_max_new=256)
@click.option("--chat", "as_chat", is_flag=True, help="Wrap PROMPT as a user message with the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@_JSON_SCHEMA
@_user_errors
def generate(model: str, device: str, backend: str, threads: int | None, precision: str | None,
             revision: str | None, prompt: str, as_chat: bool, as_json: bool, json_schema_file: str | None,
             **options: Any) -> None:
    """Complete PROMPT ("-" reads stdin) with MODEL.

    MODEL is an export folder, or a short name, hub id or checkpoint folder: that is exported once into
    the local store (see `phi-onnx list`) and reused.
    """
    kwargs = _check_options(options)
    _check_stop(kwargs)
    kwargs["json_schema"] = _read_schema(json_schema_file)
    if prompt == "-":
        prompt = _read_stdin("The prompt on stdin")
        prompt = prompt.removesuffix("\n").removesuffix("\r")  # the newline `echo` adds, as chat --once drops it
    else:
        _check_text(prompt, "The prompt")
    lm = _load(model, device, backend, threads, precision, revision)
    stream = (lm.chat_stream([{"role": "user", "content": prompt}], **kwargs) if as_chat
              else lm.stream(prompt, **kwargs))
    if as_json:
        click.echo(json.dumps(stream.finish().to_dict(), ensure_ascii=False))
        return
    try:
        for piece in stream:
            click.echo(piece, nl=False)
    finally:
        click.echo()
        stream.close()
        if stream.result is not None:
            click.echo(_stats(stream.result), err=True)


@click.command()
@_model_options
@click.option("--system", default=None, help="System prompt.")
@click.option("--once", is_flag=True, help="Answer one message read from stdin, then exit (for scripts).")
@click.option("--json", "as_json", is_flag=True, help="With --once: print the reply as JSON.")
@generation_options(default_max_new=512)
@_JSON_SCHEMA
@_user_errors
def chat(model: str, device: str, backend: str, threads: int | None, precision: str | None, revision: str | None,
         system: str | None, once: bool, as_json: bool, json_schema_file: str | None, **options: Any) -> None:
    """Chat with MODEL, streaming replies. /reset, /system TEXT, /help, /exit; Ctrl-C stops a reply.

    MODEL is an export folder, or a short name, hub id or checkpoint folder: that is exported once into
    the local store (see `phi-onnx list`) and reused.
    """
    kwargs = _check_options(options)
    _check_stop(kwargs)
    kwargs["json_schema"] = _read_schema(json_schema_file)
    if system is not None:
        _check_text(system, "The system prompt")
    text = ""
    if once:
        text = _read_stdin("The message on stdin").strip()
        if not text:
            raise click.UsageError("--once reads the message from stdin, which was empty.")
    lm = _load(model, device, backend, threads, precision, revision)
    session = lm.start_chat(system=system, **kwargs)
    if once:
        stream = session.stream(text)
        if as_json:
            click.echo(json.dumps(stream.finish().to_dict(), ensure_ascii=False))
            return
        _print_reply(stream)
        return
    stdin = click.get_binary_stream("stdin")
    interactive = stdin.isatty()
    if interactive and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started with SIGINT ignored (inherited from a parent that ignores it): Python then never raises
        # KeyboardInterrupt, and Ctrl-C, this chat's way to stop a reply, would do nothing while one streams.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    editor = _line_editor() if interactive else None
    click.echo(f"phi-onnx chat: {_display_name(model, lm.path)} on {lm.provider} ({lm.backend} backend, "
               f"{lm.context_length}-token context). {CHAT_HELP} Ctrl-C stops a reply."
               + (f" {EDITOR_HELP}" if editor is not None else ""), err=True)
    while True:
        try:
            line = _read_line(stdin, interactive, editor)
        except KeyboardInterrupt:
            click.echo("\n(Ctrl-C stops a reply; /exit or Ctrl-D quits.)", err=True)
            continue
        if line is None:
            break
        if line is _NOT_UTF8:
            click.echo(f"(that line {NOT_UTF8}; it was not sent — type it again)", err=True)
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            if command in ("/exit", "/quit", "/bye"):
                break
            if command == "/reset":
                session.reset()
                click.echo("(conversation cleared)", err=True)
            elif command in ("/help", "/?"):
                click.echo(CHAT_HELP + " Ctrl-C stops a reply; Ctrl-D quits."
                           + (f" {EDITOR_HELP}" if editor is not None else ""), err=True)
            elif command == "/system":
                session.set_system(argument.strip())
                click.echo("(system prompt set)" if argument.strip() else "(system prompt removed)", err=True)
            else:
                click.echo(f"(unknown command {command}; {CHAT_HELP})", err=True)
            continue
        try:
            stream = session.stream(line)
        except PhiOnnxError as error:  # e.g. a message too long for the context: the session goes on
            click.echo(f"Error: {cli_wording(str(error))}", err=True)
            continue
        _print_reply(stream)


_NOT_UTF8 = "\x00not utf-8"  # a sentinel _read_line returns for a line that cannot be decoded


def _line_editor() -> Any | None:
    """A prompt_toolkit session when stdin and stdout are a terminal, else None (input() is used).

    It gives history, Tab-completion of the / commands, Alt+Enter for a new line, and takes a
    bracketed paste of several lines as one message (plain input() would send each line as a turn).
    """
    import sys

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return None
    try:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.completion import WordCompleter
        from prompt_toolkit.history import InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings
    except ImportError:
        return None
    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _new_line(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    # History stays in memory: a conversation is not written to disk behind the user's back.
    return PromptSession(history=InMemoryHistory(), key_bindings=keys, completer=WordCompleter(COMMANDS, sentence=True),
                         complete_while_typing=False, prompt_continuation="... ", enable_open_in_editor=False)


def _read_line(stdin: Any, interactive: bool, editor: Any = None) -> str | None:
    """One message from the user (None at end of input, _NOT_UTF8 for bytes that are not UTF-8).

    On a terminal: a `>>> ` prompt, from the line editor (a message may hold several lines) or input().
    Piped: one line of stdin; lines are decoded one at a time, so one bad line is refused and the
    conversation goes on.
    """
    if interactive:
        if editor is not None:
            try:
                line = editor.prompt(">>> ")
            except EOFError:
                click.echo()
                return None
            return _NOT_UTF8 if any("\udc80" <= char <= "\udcff" for char in line) else line
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - line editing and history for input()
        try:
            line = input(">>> ")
        except EOFError:
            click.echo()
            return None
        except UnicodeDecodeError:
            return _NOT_UTF8
        return _NOT_UTF8 if any("\udc80" <= char <= "\udcff" for char in line) else line
    data = stdin.readline()
    if not data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return _NOT_UTF8


def _display_name(model: str, folder: Any) -> str:
    """What the banner calls the model: the name the user typed when it came from the store."""
    from pathlib import Path

    return Path(model).name if Path(model).expanduser().is_dir() else f"{model} ({folder.name})"


def _check_stop(kwargs: dict[str, Any]) -> None:
    for stop in kwargs.get("stop", ()):
        _check_text(stop, "A --stop string")


def _print_reply(stream: Any) -> None:
    try:
        for piece in stream:
            click.echo(piece, nl=False)
    except KeyboardInterrupt:
        stream.close()
        click.echo(" [stopped]", nl=False)
    click.echo()
    if stream.result is not None:
        click.echo(_stats(stream.result), err=True)


@click.command()
@_model_options
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed runs first.")
@click.option("--repeat", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed runs (the median is reported).")
@click.option("--bandwidth", "bandwidth_gbps", type=FiniteFloat(min=0, min_open=True), default=None,
              help="Memory bandwidth in GB/s for the decode ceiling (default: measured on CPU).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_user_errors
def bench(model: str, device: str, backend: str, threads: int | None, precision: str | None, revision: str | None,
          prompt_tokens: int, new_tokens: int, warmup: int, repeat: int, bandwidth_gbps: float | None,
          as_json: bool) -> None:
    """Measure prompt processing, time to first token, decode speed and memory of MODEL.

    MODEL is an export folder, or a name exported into the local store on first use (the export's time
    is not part of the load time reported).
    """
    import time

    from phi_onnx.runtime.bench import format_bench, run_bench
    from phi_onnx.store import resolve_model

    folder = resolve_model(model, device=device, precision=precision, revision=revision,
                           notify=lambda line: click.echo(line, err=True))
    started = time.perf_counter()
    lm = _load(str(folder), device, backend, threads)
    load_seconds = time.perf_counter() - started
    report = run_bench(lm, prompt_tokens=prompt_tokens, new_tokens=new_tokens, warmup=warmup, repeat=repeat,
                       bandwidth_gbps=bandwidth_gbps)
    report["load_seconds"] = round(load_seconds, 3)
    report["threads"] = threads
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_bench(report))
        click.echo(f"  load               {load_seconds:10.2f} s")
