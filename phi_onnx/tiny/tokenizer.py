"""Build a small, deterministic Phi-style byte-level BPE tokenizer offline.

The tokenizer is trained with the ``tokenizers`` library on the Python standard
library's own ``.py`` sources, so it can be rebuilt on any machine without
network access.  Two chat flavours are supported:

* ``"phi3"``: ``<|system|>`` / ``<|user|>`` / ``<|assistant|>`` role tokens, every
  turn closed by ``<|end|>`` (Phi-3 / Phi-3.5 style).
* ``"phi4"``: ``<|im_start|>role<|im_sep|>content<|im_end|>`` (Phi-4 style).

The special tokens take the lowest ids, in this order: ``<unk>`` 0, ``<s>`` 1 (BOS),
``</s>`` 2, ``<|endoftext|>`` 3 (EOS and pad), then the chat tokens (phi3:
``<|system|>`` 4, ``<|user|>`` 5, ``<|assistant|>`` 6, ``<|end|>`` 7; phi4:
``<|im_start|>`` 4, ``<|im_sep|>`` 5, ``<|im_end|>`` 6).  ``len(tokenizer) ==
vocab_size``.  No BOS/EOS is added on encode.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

Template = Literal["phi3", "phi4"]

#: Special tokens shared by both templates (ids 0-3).
BASE_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>")

#: Chat control tokens per template (ids 4 onwards).
CHAT_SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "phi3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    "phi4": ("<|im_start|>", "<|im_sep|>", "<|im_end|>"),
}

#: Token that closes one chat turn (an extra stop token for generation).
END_OF_TURN = {"phi3": "<|end|>", "phi4": "<|im_end|>"}

PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

CHAT_TEMPLATES = {"phi3": PHI3_CHAT_TEMPLATE, "phi4": PHI4_CHAT_TEMPLATE}

#: Cap on the default training corpus (bytes); keeps training to a few seconds.
_CORPUS_BYTES = 3_000_000


def stdlib_sources(max_bytes: int = _CORPUS_BYTES) -> Iterator[str]:
    """Yield the text of top-level stdlib ``.py`` files in sorted order, up to ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.glob("*.py")):
        if total >= max_bytes:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        total += len(text.encode("utf-8"))
        yield text


def _special(content: str) -> AddedToken:
    """A special token matched verbatim in text (never split, never stripped)."""
    return AddedToken(content, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)


def _train_bpe(corpus: Iterable[str], vocab_size: int, specials: list[str]) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) of ``vocab_size`` tokens whose first ids are ``specials``."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[_special(t) for t in specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def build_tokenizer(
    out_dir: str | Path,
    *,
    vocab_size: int = 2000,
    template: Template = "phi3",
    corpus: Iterable[str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train, save (``save_pretrained(out_dir)``) and return a Phi-style tokenizer.

    Args:
        out_dir: folder that receives ``tokenizer.json``, ``tokenizer_config.json``
            and ``chat_template.jinja``.
        vocab_size: total number of tokens, special tokens included.
        template: ``"phi3"`` or ``"phi4"`` chat flavour.
        corpus: training texts; defaults to a sorted slice of the stdlib sources.
    """
    if template not in CHAT_SPECIAL_TOKENS:
        raise ValueError(f"unknown template {template!r}; expected 'phi3' or 'phi4'")
    specials = [*BASE_SPECIAL_TOKENS, *CHAT_SPECIAL_TOKENS[template]]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE")

    tok = _train_bpe(stdlib_sources() if corpus is None else corpus, vocab_size, specials)
    # Pad with unused reserved tokens if the corpus was too small to fill the vocab.
    missing = vocab_size - tok.get_vocab_size()
    tok.add_special_tokens([_special(f"<|reserved_{i}|>") for i in range(missing)])
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATES[template],
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(out)
    return hf_tok
