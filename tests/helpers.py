"""Helpers shared by tests: random prompts and a bare onnxruntime loop with a KV cache."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


class OnnxLM:
    """Runs an exported model.onnx on CPU and keeps its KV cache between calls."""

    def __init__(self, folder: Path) -> None:
        self.session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values")]
        # Shapes from genai_config, so graphs with symbolic KV dims (other exporters') work too.
        decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        self.kv_heads, self.head_size = decoder["num_key_value_heads"], decoder["head_size"]
        self.reset()

    def reset(self) -> None:
        """Forget the cache."""
        self.past: dict[str, np.ndarray] = {}
        self.length = 0

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """Feed `ids` [1, n] after the cached tokens; returns logits [1, n, vocab]."""
        feeds: dict[str, np.ndarray] = {"input_ids": ids,
                                        "attention_mask": np.ones((1, self.length + ids.shape[1]), np.int64)}
        for spec in self.past_inputs:
            dtype = np.float16 if "float16" in spec.type else np.float32
            feeds[spec.name] = self.past.get(spec.name, np.zeros((1, self.kv_heads, 0, self.head_size), dtype))
        results = dict(zip(self.outputs, self.session.run(None, feeds), strict=False))
        self.past = {name.replace("present", "past_key_values"): value
                     for name, value in results.items() if name.startswith("present")}
        self.length += ids.shape[1]
        return results["logits"]


def prompt_then_decode(folder: Path, ids: np.ndarray, prompt_len: int) -> np.ndarray:
    """Logits for every position: one prefill of `prompt_len` tokens, then one token at a time."""
    lm = OnnxLM(folder)
    chunks = [lm(ids[:, :prompt_len])]
    chunks += [lm(ids[:, t:t + 1]) for t in range(prompt_len, ids.shape[1])]
    return np.concatenate(chunks, axis=1)


def op_counts(folder: Path) -> Counter:
    """How many nodes of each op type model.onnx has."""
    import onnx

    model = onnx.load(folder / "model.onnx", load_external_data=False)
    return Counter(n.op_type for n in model.graph.node)


@contextmanager
def loaded_models(folder_of: Callable[[str], Path]) -> Iterator[Callable[[str, str], Any]]:
    """`get(name, backend)` → a phi_onnx Model on CPU of `folder_of(name)`, loaded once; closed on exit."""
    import phi_onnx

    cache: dict[tuple[str, str], Any] = {}

    def get(name: str, backend: str) -> Any:
        if (name, backend) not in cache:
            cache[name, backend] = phi_onnx.load(folder_of(name), device="cpu", backend=backend)
        return cache[name, backend]

    try:
        yield get
    finally:
        for model in cache.values():
            model.close()


def genai_greedy(folder: Path, prompt: np.ndarray, new_tokens: int) -> list[int]:
    """onnxruntime-genai's greedy continuation of `prompt` [1, n], exactly `new_tokens` long."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    total = prompt.shape[1] + new_tokens
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    out: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def transformers_greedy(model: Any, prompt: np.ndarray, new_tokens: int, **kwargs: Any) -> list[int]:
    """transformers' greedy continuation, EOS suppressed so every run has `new_tokens` tokens."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, **kwargs)
    return out[0, prompt.shape[1]:].tolist()


def assert_cuda_io(folder: Path) -> None:
    """A CUDA export's KV cache is fp16 and its logits fp32."""
    import onnx

    graph = onnx.load(folder / "model.onnx", load_external_data=False).graph
    kv = next(i for i in graph.input if i.name == "past_key_values.0.key")
    assert kv.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    logits = next(o for o in graph.output if o.name == "logits")
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def random_ids(n: int, seed: int = 0, low: int = 10, high: int = 990) -> np.ndarray:
    """A [1, n] int64 prompt of random token ids."""
    return np.random.default_rng(seed).integers(low, high, size=(1, n), dtype=np.int64)


def drive(scheduler: Any, handles: list[Any], limit: int = 2000) -> None:
    """Step `scheduler` on this thread until every handle has finished (at most `limit` steps)."""
    for _ in range(limit):
        if all(h.finish for h in handles):
            return
        scheduler.step()
    raise AssertionError("requests did not finish")


def make_adapter(checkpoint: Path, folder: Path, seed: int, **config: Any) -> Path:
    """A peft LoRA adapter on `checkpoint`, with random (non-zero) A and B, saved to `folder`.

    `config` is peft's LoraConfig (r, lora_alpha, target_modules, ...). Needs peft and torch (the reference extra).
    """
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **config))
    model.save_pretrained(folder)
    return folder


def save_tiny_checkpoint(model: Any, folder: Path, tokenizer_dir: Path,
                         eos: tuple[str, ...] = ("<|endoftext|>", "<|end|>")) -> Path:
    """Save a transformers model with the session tokenizer and a generation_config naming `eos`."""
    model.save_pretrained(folder)
    for item in tokenizer_dir.iterdir():
        shutil.copy2(item, folder / item.name)
    added = json.loads((tokenizer_dir / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in added}
    eos_ids = [ids[name] for name in eos]
    gen = {"bos_token_id": 1, "eos_token_id": eos_ids if len(eos_ids) > 1 else eos_ids[0], "pad_token_id": 3}
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


def cached_exports(tmp_path_factory: Any, checkpoint: Callable[[str], Path]) -> Callable[..., Path]:
    """`make(name, precision="fp32", **options)` → export of `checkpoint(name)`, built once per key."""
    from phi_onnx.export import ExportOptions, export

    cache: dict[tuple[Any, ...], Path] = {}

    def make(name: str, precision: str = "fp32", **options: Any) -> Path:
        key = (name, precision, tuple(sorted(options.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("export") / f"{name}-{precision}"
            export(checkpoint(name), out, ExportOptions(precision=precision, **options))  # type: ignore[arg-type]
            cache[key] = out
        return cache[key]

    return make


def heldout_windows_of(checkpoint: Path, text: Path, window: int) -> np.ndarray:
    """The text's tokens (the checkpoint's tokenizer.json) as [windows, window]; the tail is dropped."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(checkpoint / "tokenizer.json")).encode(text.read_text()).ids
    count = len(ids) // window
    return np.asarray(ids[: count * window], dtype=np.int64).reshape(count, window)


def window_log_probs(folder: Path, rows: np.ndarray) -> np.ndarray:
    """log-softmax of the export's logits for each window (each from an empty cache), float64."""
    lm = OnnxLM(folder)
    out = []
    for row in rows:
        lm.reset()
        logits = lm(row[None])[0].astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        out.append(logits - np.log(np.exp(logits).sum(-1, keepdims=True)))
    return np.stack(out)


def kl_and_top1(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per window: mean KL(reference || candidate) and the share of positions with the same argmax."""
    kl = (np.exp(reference) * (reference - candidate)).sum(-1).mean(-1)
    return kl, (reference.argmax(-1) == candidate.argmax(-1)).mean(-1)


#: microsoft/Phi-4-mini-instruct's chat template, verbatim (tokenizer_config.json): tools are read from
#: the system message's "tools" string, not from a top-level `tools` variable.
PHI4_MINI_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
    "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
    "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")
#: Phi-4-mini's tool tokens; like its tokenizer.json, not flagged special (they stay in decoded text).
PHI4_MINI_TOOL_TOKENS = ("<|tool|>", "<|/tool|>", "<|tool_call|>", "<|/tool_call|>", "<|tool_response|>")


def phi4_mini_tools_tokenizer(tokenizer_dir: Path, out: Path) -> Path:
    """The session tokenizer with Phi-4-mini's tool tokens (not special) and its exact chat template."""
    from tokenizers import AddedToken, Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PHI4_MINI_TOOL_TOKENS])
    tok.save(str(out / "tokenizer.json"))
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)  # ids and flags come from tokenizer.json
    config["chat_template"] = PHI4_MINI_CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    (out / "chat_template.jinja").write_text(PHI4_MINI_CHAT_TEMPLATE)
    for name in ("special_tokens_map.json",):
        if (tokenizer_dir / name).exists():
            shutil.copy2(tokenizer_dir / name, out / name)
    return out


# OpenAI function tools the runtime and server tool-call tests share.
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -99, "maximum": 99},
                                                    "b": {"type": "integer", "minimum": -99, "maximum": 99}},
                   "required": ["a", "b"], "additionalProperties": False}}}
