"""The `phi-onnx chat`, `generate` and `bench` commands (added to the CLI group in phi_onnx/cli/__init__.py)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

from phi_onnx.cli.errors import user_errors
from phi_onnx.errors import PhiOnnxError

F = TypeVar("F", bound=Callable[..., Any])

CHAT_HELP = "Commands: /reset (forget the conversation), /system TEXT (set the system prompt), /exit."


_user_errors = user_errors(interrupted="")  # Ctrl-C during a reply is handled inside chat


def _model_options(func: F) -> F:
    func = click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="Intra-op threads (default: one per physical core).")(func)
    func = click.option("--backend", type=click.Choice(["auto", "genai", "ort"]), default="auto", show_default=True,
                        help="onnxruntime-genai, or phi-onnx's own loop on plain onnxruntime.")(func)
    func = click.option("--device", default="auto", show_default=True,
                        help="auto, cpu, cuda or cuda:N (auto uses CUDA only when it really works).")(func)
    return click.argument("model", type=click.Path(file_okay=False))(func)


def _generation_options(default_max_new: int) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        options = [
            click.option("--max-new-tokens", type=int, default=default_max_new, show_default=True),
            click.option("--min-new-tokens", type=int, default=None, help="Suppress EOS until this many tokens."),
            click.option("--temperature", type=float, default=None, help="0 (default) is greedy; > 0 samples."),
            click.option("--top-k", type=int, default=None, help="Sample among the k most likely tokens."),
            click.option("--top-p", type=float, default=None, help="Nucleus sampling, in (0, 1]."),
            click.option("--repetition-penalty", type=float, default=None, help="transformers' penalty (1.0: off)."),
            click.option("--seed", type=int, default=None, help="Seed for reproducible sampling."),
            click.option("--stop", multiple=True, help="Stop string (repeatable); the reply ends before it."),
        ]
        for option in reversed(options):
            func = option(func)
        return func
    return decorate


def _gen_kwargs(max_new_tokens: int, min_new_tokens: int | None, temperature: float | None, top_k: int | None,
                top_p: float | None, repetition_penalty: float | None, seed: int | None,
                stop: tuple[str, ...]) -> dict[str, Any]:
    values = {"max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens, "temperature": temperature,
              "top_k": top_k, "top_p": top_p, "repetition_penalty": repetition_penalty, "seed": seed,
              "stop": stop or None}
    return {key: value for key, value in values.items() if value is not None}


def _load(model: str, device: str, backend: str, threads: int | None) -> Any:
    from phi_onnx.runtime.model import load

    return load(model, device=device, backend=backend, threads=threads)


def _stats(result: Any) -> str:
    speed = f", {result.decode_tokens_per_second:.1f} tokens/s" if result.new_tokens > 1 else ""
    cached = f", {result.cached_tokens} cached" if result.cached_tokens else ""
    return (f"[{result.new_tokens} tokens{speed}, first token {result.first_token_seconds * 1000:.0f} ms, "
            f"prompt {result.prompt_tokens}{cached}, {result.provider} / {result.backend}, {result.finish_reason}]")


@click.command()
@_model_options
@click.argument("prompt")
@_generation_options(default_max_new=256)
@click.option("--chat", "as_chat", is_flag=True, help="Wrap PROMPT as a user message with the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@_user_errors
def generate(model: str, device: str, backend: str, threads: int | None, prompt: str, as_chat: bool,
             as_json: bool, **options: Any) -> None:
    """Complete PROMPT ("-" reads stdin) with the model in MODEL (an export folder)."""
    if prompt == "-":
        prompt = click.get_text_stream("stdin").read()
    lm = _load(model, device, backend, threads)
    kwargs = _gen_kwargs(**options)
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
@_generation_options(default_max_new=512)
@_user_errors
def chat(model: str, device: str, backend: str, threads: int | None, system: str | None, once: bool,
         as_json: bool, **options: Any) -> None:
    """Chat with the model in MODEL, streaming replies. /reset, /system TEXT, /exit; Ctrl-C stops a reply."""
    lm = _load(model, device, backend, threads)
    session = lm.start_chat(system=system, **_gen_kwargs(**options))
    stdin = click.get_text_stream("stdin")
    if once:
        text = stdin.read().strip()
        if not text:
            raise click.UsageError("--once reads the message from stdin, which was empty.")
        stream = session.stream(text)
        if as_json:
            click.echo(json.dumps(stream.finish().to_dict(), ensure_ascii=False))
            return
        _print_reply(stream)
        return
    interactive = stdin.isatty()
    click.echo(f"phi-onnx chat: {lm.path.name} on {lm.provider} ({lm.backend} backend, "
               f"{lm.context_length}-token context). {CHAT_HELP} Ctrl-C stops a reply.", err=True)
    while True:
        try:
            line = _read_line(stdin, interactive)
        except KeyboardInterrupt:
            click.echo("\n(Ctrl-C stops a reply; /exit or Ctrl-D quits.)", err=True)
            continue
        if line is None:
            break
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
            elif command == "/system":
                session.set_system(argument.strip())
                click.echo("(system prompt set)" if argument.strip() else "(system prompt removed)", err=True)
            else:
                click.echo(f"(unknown command {command}; {CHAT_HELP})", err=True)
            continue
        try:
            stream = session.stream(line)
        except PhiOnnxError as error:  # e.g. a message too long for the context: the session goes on
            click.echo(f"Error: {error}", err=True)
            continue
        _print_reply(stream)


def _read_line(stdin: Any, interactive: bool) -> str | None:
    """One line from the user (None at end of input); a `>>> ` prompt only on a terminal."""
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - line editing and history for input()
        try:
            return input(">>> ")
        except EOFError:
            click.echo()
            return None
    line = stdin.readline()
    return line if line else None


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
@click.option("--prompt-tokens", type=int, default=128, show_default=True)
@click.option("--new-tokens", type=int, default=128, show_default=True)
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed runs first.")
@click.option("--repeat", type=int, default=3, show_default=True, help="Timed runs (the median is reported).")
@click.option("--bandwidth", "bandwidth_gbps", type=float, default=None,
              help="Memory bandwidth in GB/s for the decode ceiling (default: measured on CPU).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_user_errors
def bench(model: str, device: str, backend: str, threads: int | None, prompt_tokens: int, new_tokens: int,
          warmup: int, repeat: int, bandwidth_gbps: float | None, as_json: bool) -> None:
    """Measure prompt processing, time to first token, decode speed and memory of MODEL."""
    import time

    from phi_onnx.runtime.bench import format_bench, run_bench

    started = time.perf_counter()
    lm = _load(model, device, backend, threads)
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
