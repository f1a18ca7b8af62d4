"""`phi_onnx.load()` and the `Model` facade: generate, stream, chat on either backend."""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from phi_onnx.errors import OptionsError
from phi_onnx.runtime.chat import ChatSession, ChatTemplate, Message, check_messages, fit_chat, load_chat_template
from phi_onnx.runtime.engine import Engine
from phi_onnx.runtime.errors import ModelFolderError
from phi_onnx.runtime.folder import ModelFolder, check_vocabulary, read_folder
from phi_onnx.runtime.genai_backend import genai_available
from phi_onnx.runtime.generation import Generation, GenerationResult, TextStream
from phi_onnx.runtime.providers import DeviceChoice, check_threads, resolve_device
from phi_onnx.runtime.sampling import GenerationOptions
from phi_onnx.runtime.tokenizer import TextTokenizer, check_text, check_token_ids, is_token_id

if TYPE_CHECKING:
    from phi_onnx.runtime.core import DecodeCore
    from phi_onnx.runtime.grammar import Constraint, GrammarProcessor
    from phi_onnx.runtime.tools import ToolCallSwitch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "genai", "ort")

Prompt = str | Sequence[int]

#: Keyword arguments of generate/stream/chat/chat_stream that constrain the reply (`Model.options`).
CONSTRAINT_KEYWORDS = ("json_schema", "regex", "grammar", "json_object", "strict")
#: Compiled grammars kept per Model.
GRAMMAR_CACHE = 16


def load(path: str | os.PathLike[str], device: str = "auto", backend: str = "auto", *,
         threads: int | None = None, check_files: bool = False, **defaults: Any) -> Model:
    """Load an exported model folder for generation.

    Args:
        path: a folder written by `phi-onnx export` (model.onnx, genai_config.json, tokenizer).
        device: "auto" (CUDA when it really works and the export targets it, else CPU, logging why),
            "cpu", "cuda" or "cuda:N" (an error, not a fallback, when CUDA cannot run).
        backend: "auto" (onnxruntime-genai when installed, else "ort"), "genai", or "ort" (our own
            loop on plain onnxruntime). Both give identical greedy tokens.
        threads: intra-op threads (default: ONNX Runtime's, one per physical core); at most 4 per CPU core.
        check_files: first hash every file and compare with the sha256 in the manifest (reads the whole
            model once; off by default to keep loading fast). Raises IntegrityError naming what changed.
        **defaults: default generation options (max_new_tokens, temperature, stop, ...).

    Raises:
        PhiOnnxError: the folder is not a usable export, the device cannot be used, or an option is invalid.
    """
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise OptionsError(f"load() takes the path of an export folder, not {type(path).__name__} {path!r}.",
                           hint='Pass e.g. phi_onnx.load("phi3-mini-int4") (a str or pathlib.Path).')
    if not isinstance(device, str) or not isinstance(backend, str):
        raise OptionsError(f"device and backend are strings (got {device!r}, {backend!r}).",
                           hint=f'Use e.g. device="cpu", backend="ort" (backends: {", ".join(BACKENDS)}).')
    threads = check_threads(threads)
    if backend not in BACKENDS:
        raise OptionsError(f"Unknown backend {backend!r}.", hint=f"Choose one of: {', '.join(BACKENDS)}.")
    options = GenerationOptions.from_kwargs(None, **defaults)
    folder = read_folder(path)
    if check_files:
        from phi_onnx.verify.files import require_intact

        require_intact(folder.path)
    tokenizer = TextTokenizer(folder.path)
    check_vocabulary(folder, tokenizer.vocab_size)
    choice = resolve_device(device, folder.export_device)
    if backend == "auto":
        # Switchable adapters: the ort backend batches rows with different adapters; genai runs one at a time.
        lora = (folder.path / "adapters.json").is_file()
        backend = "genai" if genai_available() and not lora else "ort"
        if backend == "ort":
            log.info("onnxruntime-genai is not installed; using the ort backend.")
    if backend == "genai":
        if not genai_available():
            raise OptionsError("backend='genai' needs onnxruntime-genai, which is not installed.",
                               hint="pip install onnxruntime-genai (or onnxruntime-genai-cuda), or use backend='ort'.")
        from phi_onnx.runtime.genai_backend import GenaiEngine

        engine: Engine = GenaiEngine(folder, choice, threads=threads)
    else:
        from phi_onnx.runtime.ort_backend import OrtEngine

        engine = OrtEngine(folder, choice, threads=threads)
    model = Model(folder, tokenizer, engine, choice, options)
    log.info("Loaded %s on %s (%s backend)", folder.path, model.provider, model.backend)
    return model


@dataclass(frozen=True)
class PreparedChat:
    """A chat request ready to run (`Model.prepare_chat`)."""

    prompt_ids: list[int]
    options: GenerationOptions
    tool_format: str | None = None  # "phi4-mini" or "generic" when the reply may hold calls
    dropped: int = 0  # oldest messages dropped to fit the context
    structured: bool = False  # the text answer follows a response format (parse_tool_calls(structured=))
    tool_names: tuple[str, ...] = ()  # the tools offered (parse_tool_calls(names=))


class EngineLock:
    """One caller at a time on a Model's engine (its KV cache): reentrant per thread, and held by a
    stream from its creation until it ends, is closed or is garbage-collected — from any thread.

    A thread that left one of its own streams open and calls the model again gets OptionsError
    instead of a deadlock (it would wait for itself) or a corrupted stream.
    """

    def __init__(self) -> None:
        self._free = threading.Condition()
        self._owner: int | None = None
        self._depth = 0
        self._streams = 0  # of the holds, how many belong to open streams

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock for a call (waits while another thread, or its stream, has it)."""
        self._acquire(stream=False)
        try:
            yield
        finally:
            self._release(stream=False)

    def hold_for_stream(self) -> Callable[[], None]:
        """Take the lock for a stream; returns its release function (safe to call twice, from any thread)."""
        self._acquire(stream=True)
        released = threading.Lock()

        def release() -> None:
            if released.acquire(blocking=False):
                self._release(stream=True)

        return release

    def _acquire(self, *, stream: bool) -> None:
        me = threading.get_ident()
        with self._free:
            if self._owner == me and self._streams:
                raise OptionsError(
                    "This thread still has an unfinished stream of this model, which holds the model.",
                    hint="Iterate the stream to its end or call its close() before the next call "
                         "(other threads wait for it automatically).")
            while self._owner not in (None, me):
                self._free.wait()
            self._owner = me
            self._depth += 1
            self._streams += stream

    def _release(self, *, stream: bool) -> None:
        with self._free:
            self._depth -= 1
            self._streams -= stream
            if not self._depth:
                self._owner = None
                self._free.notify_all()


class Model:
    """A loaded export. Use `generate`, `stream`, `chat`, `chat_stream` or `start_chat`.

    Generation options are keyword arguments everywhere (see `GenerationOptions`): max_new_tokens,
    min_new_tokens, temperature (0 = greedy, the default), top_k, top_p, repetition_penalty, seed, stop;
    and a constraint on the reply: json_schema=, regex=, grammar= (Lark), json_object=True (see
    `phi_onnx.runtime.grammar`). `chat` and `chat_stream` also take tools= and tool_choice=.

    A Model may be shared by threads: calls that use the engine run one at a time (the others wait),
    and a stream holds the model from its creation until it is exhausted, closed or dropped — so
    finish or close streams promptly. `lock` is that lock, for code that drives `engine` directly.
    """

    def __init__(self, folder: ModelFolder, tokenizer: TextTokenizer, engine: Engine, device: DeviceChoice,
                 defaults: GenerationOptions | None = None) -> None:
        self.folder = folder
        self.tokenizer = tokenizer
        self.engine = engine
        self.device = device
        self.defaults = defaults or GenerationOptions()
        self.lock = EngineLock()
        self._template: ChatTemplate | None = None
        self._template_lock = threading.Lock()
        self._grammars: dict[str, GrammarProcessor] = {}

    # -- facts ---------------------------------------------------------------------------------
    @property
    def provider(self) -> str:
        """The execution provider actually running the model (e.g. "CPUExecutionProvider")."""
        return self.engine.provider

    @property
    def backend(self) -> str:
        """"genai" or "ort"."""
        return self.engine.backend

    @property
    def core(self) -> DecodeCore:
        """The ort backend's decode core (its session, run, prefill and decode), which the Scheduler drives too."""
        core = getattr(self.engine, "core", None)
        if core is None:
            raise OptionsError(f"This model runs on the {self.backend} backend, which has no decode core to share.",
                               hint='Load it with phi_onnx.load(path, backend="ort").')
        return core

    @property
    def adapters(self) -> tuple[str, ...]:
        """The names of the export's switchable LoRA adapters (`generate(..., adapter=NAME)`); empty without."""
        from phi_onnx.export.lora import read_index

        index = read_index(self.folder.path)
        return tuple(sorted(index["adapters"])) if index is not None else ()

    @property
    def device_reason(self) -> str:
        """Why this device was chosen (e.g. why CUDA was not used)."""
        return self.device.reason

    @property
    def context_length(self) -> int:
        """The most tokens (prompt plus reply) the model can attend to."""
        return self.folder.context_length

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends a reply."""
        return self.folder.eos_token_ids

    @property
    def default_max_new_tokens(self) -> int:
        """max_new_tokens when a call does not give one."""
        return self.defaults.max_new_tokens

    @property
    def path(self) -> Path:
        """The export folder."""
        return self.folder.path

    # -- text ----------------------------------------------------------------------------------
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`."""
        if not isinstance(text, str):
            raise OptionsError(f"encode() takes a string, not {type(text).__name__}.",
                               hint="Decode bytes first (e.g. data.decode('utf-8')).")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (special tokens dropped); OptionsError for an id outside the vocabulary, as `generate`."""
        items = _items(ids, "token ids")
        if not all(is_token_id(t) for t in items):
            raise OptionsError("decode() takes a list of token ids (integers).", hint="Pass e.g. result.token_ids.")
        return self.tokenizer.decode(check_token_ids(items, self.folder.vocab_size))

    @property
    def chat_template(self) -> ChatTemplate:
        """The model's chat template (ModelFolderError when the export has none)."""
        with self._template_lock:
            if self._template is None:
                source = load_chat_template(self.folder.path, self.tokenizer.config)
                if source is None:
                    raise ModelFolderError(
                        f"{self.folder.path} has no chat template (neither chat_template.jinja nor a "
                        "chat_template in tokenizer_config.json).",
                        hint="Use `generate` for plain completion, or add the template from the source checkpoint.")
                self._template = ChatTemplate(source, self.tokenizer.special_tokens)
            return self._template

    def render_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> str:
        """The prompt text the chat template makes of `messages`."""
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)

    def chat_prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of the rendered chat prompt (no special tokens added, as transformers does)."""
        return self.encode(self.render_chat(messages), add_special_tokens=False)

    # -- generation ----------------------------------------------------------------------------
    def options(self, **kwargs: Any) -> GenerationOptions:
        """The load-time defaults with `kwargs` applied (validated; an adapter must be one of `adapters`).

        The constraint keywords (`CONSTRAINT_KEYWORDS`: json_schema, regex, grammar, json_object,
        strict) become a grammar logits processor, appended after any given `logits_processors`.
        """
        asked = {name: kwargs.pop(name) for name in CONSTRAINT_KEYWORDS if name in kwargs}
        opts = GenerationOptions.from_kwargs(self.defaults, **kwargs)
        if opts.adapter is not None and opts.adapter not in self.adapters:
            listed = ", ".join(self.adapters) or "none"
            raise OptionsError(f"This model has no adapter {opts.adapter!r} (its adapters: {listed}).",
                               hint="Pick one of them (Model.adapters), or add it with "
                                    "`phi-onnx adapter add FOLDER NAME=PATH`.")
        if not asked:
            return opts
        from phi_onnx.runtime.grammar import constraint_from

        constraint = constraint_from(**asked)
        if constraint is None:
            return opts
        return GenerationOptions.from_kwargs(opts, logits_processors=(*opts.logits_processors,
                                                                      self.grammar(constraint)))

    def grammar(self, constraint: Constraint) -> GrammarProcessor:
        """`constraint` compiled for this model's tokenizer, as a logits processor (one matcher per
        sequence). The last few are cached: a server sees the same schema request after request."""
        from phi_onnx.runtime.grammar import GrammarProcessor, grammar_tokenizer

        with self._template_lock:
            cached = self._grammars.get(constraint.source)
            if cached is not None:
                return cached
        processor = GrammarProcessor(constraint, grammar_tokenizer(self.folder.path, self.folder.vocab_size,
                                                                   self.eos_token_ids), self.folder.vocab_size)
        with self._template_lock:
            self._grammars[constraint.source] = processor
            while len(self._grammars) > GRAMMAR_CACHE:
                self._grammars.pop(next(iter(self._grammars)))
        return processor

    def tool_call_switch(self, constraint: Constraint) -> ToolCallSwitch:
        """phi4-mini "auto" tool calls as a logits processor: free text until the model opens a call with
        `<|tool_call|>`, then `constraint` compiled for this model (`ToolPlan.switch`/`ReplyPlan.switch`)."""
        from phi_onnx.runtime.tools import CALL_OPEN, ToolCallSwitch

        opened = self.tokenizer.token_to_id(CALL_OPEN)
        if opened is None:
            raise OptionsError(f"This model's vocabulary has no {CALL_OPEN} token for tool calls.",
                               hint="Tool calls of this format need a Phi-4-mini tokenizer.")
        return ToolCallSwitch(self.grammar(constraint), opened)

    @overload
    def generate(self, prompt: Prompt, **options: Any) -> GenerationResult: ...
    @overload
    def generate(self, prompt: Sequence[Prompt], **options: Any) -> list[GenerationResult]: ...

    def generate(self, prompt: Prompt | Sequence[Prompt], **options: Any) -> GenerationResult | list[GenerationResult]:
        """Complete a prompt: text, or token ids; a list of prompts gives a list of results.

        Batched prompts run together (right-padded) on the ort backend and one after another on genai.
        """
        opts = self.options(**options)
        prompts, batched = self._prompts(prompt)
        with self.lock.held():
            if not batched:
                return self._run(prompts, opts)[0]
            if self.engine.max_batch == 1:
                return [self._run([p], opts)[0] for p in prompts]
            return self._run(prompts, opts)

    def stream(self, prompt: Prompt, **options: Any) -> TextStream:
        """Like `generate` for one prompt, but iterate to get text pieces as they are produced.

        The stream holds the model (other threads' calls wait) until it is exhausted, closed, or
        garbage-collected; in the thread that opened it, finish or close it before the next call.
        """
        prompts, batched = self._prompts(prompt)
        if batched:
            raise OptionsError("stream() takes one prompt.", hint="Call generate() with a list of prompts.")
        return self._stream(prompts, self.options(**options))

    def chat(self, messages: Sequence[Message], *, tools: Sequence[Any] | None = None, tool_choice: Any = None,
             parallel_tool_calls: bool = True, **options: Any) -> GenerationResult:
        """The assistant's reply to `messages` ([{"role", "content"}], optional system message first).

        With `tools` (OpenAI's function tools) the model may call them: `result.tool_calls` lists the
        calls (`phi_onnx.runtime.tools.ToolCall`), `result.content` the text outside them, and
        finish_reason is "tool_calls". tool_choice: "none", "auto" (default), "required" or
        {"type": "function", "function": {"name": ...}}; "required" and a named tool always yield
        valid calls (constrained decoding). History may hold assistant messages with `tool_calls`
        and `role: "tool"` results. See `phi_onnx.runtime.tools` for the formats per model.

        A response format (json_schema= or json_object=) combines with tools: with tool_choice "auto"
        the reply is either valid calls or `content` valid against the format; with "required" or a
        named tool the reply is a call (the format is for a later reply in text). regex= and grammar=
        cannot be combined with tools that may be called (OptionsError).
        """
        return self.chat_stream(messages, tools=tools, tool_choice=tool_choice,
                                parallel_tool_calls=parallel_tool_calls, **options).finish()

    def chat_stream(self, messages: Sequence[Message], *, tools: Sequence[Any] | None = None,
                    tool_choice: Any = None, parallel_tool_calls: bool = True, **options: Any) -> TextStream:
        """Stream the assistant's reply to `messages` (oldest turns dropped if they outgrow the context).

        Like `stream`, the stream holds the model until it ends or is closed. With tools, the pieces
        are the raw reply (call markup included): feed them to `ToolCallStream(stream.tool_format,
        structured=stream.structured, names=stream.tool_names)` for content and call deltas; the finished `result` has
        `tool_calls` and `content`.
        """
        prepared = self.prepare_chat(messages, tools=tools, tool_choice=tool_choice,
                                     parallel_tool_calls=parallel_tool_calls, **options)
        stream = self._stream([prepared.prompt_ids], prepared.options)
        stream.dropped_messages = prepared.dropped
        stream.tool_format = prepared.tool_format
        stream.structured = prepared.structured
        stream.tool_names = prepared.tool_names
        fmt = prepared.tool_format
        if fmt is not None:
            stream.on_finish(lambda result: _attach_calls(result, fmt, prepared.structured, prepared.tool_names))
        return stream

    def prepare_chat(self, messages: Sequence[Message], *, tools: Sequence[Any] | None = None,
                     tool_choice: Any = None, parallel_tool_calls: bool = True, **options: Any) -> PreparedChat:
        """What a chat request runs: the prompt's token ids, the options (with the grammar or tool-call
        processor appended), the tool format (None without tools) and how many old messages were dropped.

        `chat_stream` runs it on this thread; a server submits `prompt_ids` and `options` to its
        Scheduler and parses the reply with `phi_onnx.runtime.tools.parse_tool_calls` /
        `ToolCallStream` when `tool_format` is set.
        """
        from phi_onnx.runtime.tools import plan_reply, uses_tools

        if uses_tools(messages, tools, tool_choice):
            asked = {name: options.pop(name) for name in CONSTRAINT_KEYWORDS if name in options}
            plan = plan_reply(_items(messages, "messages"), tools, tool_choice, asked,
                              template_source=self.chat_template.source, vocabulary=self.tokenizer.vocabulary(),
                              parallel_tool_calls=parallel_tool_calls)
            messages = plan.messages
            if plan.constraint is not None:
                options["grammar"] = plan.constraint
            elif plan.switch is not None:
                base = self.options(**options)
                options["logits_processors"] = (*base.logits_processors, self.tool_call_switch(plan.switch))
            options.update(plan.asked)  # the format applies to the reply as without tools
            fmt, structured, names = plan.tool_format, plan.structured, plan.names
        else:
            fmt, structured, names = None, False, ()
        messages = check_messages(messages)
        opts = self.options(**options)
        kept, dropped = self.fit_chat(messages, opts.max_new_tokens)
        return PreparedChat(self.chat_prompt_ids(kept), opts, fmt, dropped, structured, names)

    def fit_chat(self, messages: Sequence[Message], max_new_tokens: int | None = None) -> tuple[list[Message], int]:
        """Drop the oldest turns until the prompt leaves room for a reply of max_new_tokens (at most half
        the context); returns (kept messages, number dropped). See `phi_onnx.runtime.chat.fit_chat`.

        Raises PromptTooLongError when even the last message (with the system prompt) does not fit.
        """
        return fit_chat(messages, lambda m: len(self.chat_prompt_ids(m)), self.context_length,
                        max_new_tokens or self.default_max_new_tokens)

    def start_chat(self, system: str | None = None, **options: Any) -> ChatSession:
        """A conversation that keeps its history (and drops the oldest turns when it outgrows the context)."""
        self.options(**options)  # validate now rather than at the first turn
        if system is not None and not isinstance(system, str):
            raise OptionsError(f"The system prompt is text, not {type(system).__name__}.", hint="Pass a string.")
        return ChatSession(self, system=system, options=options)

    def close(self) -> None:
        """Free the session and the KV cache (waits for other threads' calls and streams to end)."""
        with self.lock.held():
            self.engine.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Model({str(self.path)!r}, provider={self.provider!r}, backend={self.backend!r})"

    # -- internals -----------------------------------------------------------------------------
    def _prompts(self, prompt: Prompt | Sequence[Prompt]) -> tuple[list[list[int]], bool]:
        """Normalise a prompt or a list of them to token id lists; (prompts, was a list of prompts)."""
        vocab = self.folder.vocab_size
        if isinstance(prompt, str):
            return [self.encode(check_text(prompt, "The prompt"))], False
        items = _items(prompt)
        if items and all(is_token_id(p) for p in items):
            return [check_token_ids(items, vocab)], False
        out = []
        for i, p in enumerate(items):
            if isinstance(p, str):
                out.append(self.encode(check_text(p, f"Prompt {i}")))
            else:
                ids = _items(p)
                if not all(is_token_id(t) for t in ids):
                    raise OptionsError(f"A prompt's token ids must be integers (got {ids!r:.80}).",
                                       hint="Pass a string, a list of token ids, or a list of those.")
                out.append(check_token_ids(ids, vocab))
        if not out:
            raise OptionsError("No prompt was given.", hint="Pass a string or a list of strings.")
        return out, True

    def _generation(self, prompts: list[list[int]], opts: GenerationOptions) -> Generation:
        return Generation(self.engine, self.tokenizer, prompts, opts, self.eos_token_ids, self.context_length,
                          self.folder.vocab_size)

    def _stream(self, prompts: list[list[int]], opts: GenerationOptions) -> TextStream:
        """A stream holding the lock until it finishes, is closed, or is garbage-collected."""
        release = self.lock.hold_for_stream()
        try:
            stream = TextStream(self._generation(prompts, opts))
        except BaseException:
            release()
            raise
        stream.on_finish(lambda _result: release())
        weakref.finalize(stream, release)  # an abandoned stream must not hold the model forever
        return stream

    def _run(self, prompts: list[list[int]], opts: GenerationOptions) -> list[GenerationResult]:
        generation = self._generation(prompts, opts)
        for _ in generation.pieces():
            pass
        return generation.results()


def _items(prompt: Any, what: str = "a prompt") -> list[Any]:
    """A prompt's (or token id list's) elements; bytes (not token ids) and non-sequences are refused."""
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise OptionsError(f"{what.capitalize()} cannot be {type(prompt).__name__}: its bytes are not token ids.",
                           hint="Decode it to a string first (e.g. prompt.decode('utf-8')).")
    if hasattr(prompt, "tolist") and not isinstance(prompt, (str, Sequence)):
        prompt = prompt.tolist()  # numpy arrays (and tensors)
        if not isinstance(prompt, list):
            prompt = [prompt]
    if not isinstance(prompt, Sequence) or isinstance(prompt, str):
        raise OptionsError(f"Cannot use {type(prompt).__name__} as {what}.",
                           hint="Pass a string, a list of token ids, or a list of those.")
    return list(prompt)


def _attach_calls(result: GenerationResult, fmt: str, structured: bool = False,
                  names: Sequence[str] | None = None) -> None:
    """Parse a finished reply's tool calls into `result.tool_calls` / `result.content`."""
    from phi_onnx.runtime.tools import parse_tool_calls

    if result.finish_reason == "interrupted":
        result.content = result.text
        return
    result.content, result.tool_calls = parse_tool_calls(result.text, fmt, structured=structured, names=names)
    if result.tool_calls and result.finish_reason in ("eos", "stop"):
        result.finish_reason = "tool_calls"
