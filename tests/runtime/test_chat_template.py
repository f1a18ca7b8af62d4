"""Chat prompts equal transformers' `apply_chat_template`; history, system prompt and trimming."""

from __future__ import annotations

import shutil

import pytest
from transformers import AutoTokenizer

import phi_onnx
from phi_onnx.errors import OptionsError, PhiOnnxError
from phi_onnx.runtime.chat import ChatTemplate, trim_history
from phi_onnx.runtime.tokenizer import TextTokenizer
from phi_onnx.tiny import build_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What does os.path.join do?"},
    {"role": "assistant", "content": "It joins path parts.\n  With the separator."},
    {"role": "user", "content": "And <|end|> inside text? ünïcödé"},
]

# Real-world template features: whitespace control, eos_token, raise_exception, loop controls, namespace.
PHI3_HUB_STYLE = (
    "{% for message in messages %}\n"
    "  {% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}\n"
    "  {% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}\n"
    "  {% elif message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}\n"
    "  {% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}\n"
    "{% endfor %}\n"
    "{% set ns = namespace(turns=0) %}{% for m in messages %}{% if m.role == 'user' %}"
    "{% set ns.turns = ns.turns + 1 %}{% else %}{% continue %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@pytest.fixture(scope="module")
def phi4_tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi4-tokenizer")
    build_tokenizer(folder, vocab_size=1000, template="phi4")
    return folder


def render_both(folder, messages, template: str | None = None, add_generation_prompt: bool = True):
    reference = AutoTokenizer.from_pretrained(folder)
    ours = TextTokenizer(folder)
    source = template
    if source is None:
        from phi_onnx.runtime.chat import load_chat_template

        source = load_chat_template(folder, ours.config)
    else:
        reference.chat_template = template
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    expected_ids = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                                 return_dict=False)
    text = ChatTemplate(source, ours.special_tokens).render(messages, add_generation_prompt=add_generation_prompt)
    return text, expected, ours.encode(text, add_special_tokens=False), list(expected_ids)


@pytest.mark.parametrize("which", ["phi3", "phi4"])
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:2], CONVERSATION[1:]])
def test_rendering_equals_transformers(which, messages, tokenizer_dir, phi4_tokenizer_dir):
    folder = tokenizer_dir if which == "phi3" else phi4_tokenizer_dir
    text, expected, ids, expected_ids = render_both(folder, messages)
    assert text == expected
    assert ids == expected_ids
    assert ("<|im_start|>" in text) == (which == "phi4")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_hub_style_template_equals_transformers(tokenizer_dir, add_generation_prompt):
    text, expected, ids, expected_ids = render_both(tokenizer_dir, CONVERSATION, PHI3_HUB_STYLE,
                                                    add_generation_prompt)
    assert text == expected and ids == expected_ids
    assert text.endswith("<|assistant|>\n" if add_generation_prompt else "<|endoftext|>")  # eos_token variable


def test_template_raise_exception_is_a_clear_error(tokenizer_dir):
    template = ChatTemplate(PHI3_HUB_STYLE, TextTokenizer(tokenizer_dir).special_tokens)
    with pytest.raises(OptionsError, match="unknown role tool"):
        template.render([{"role": "tool", "content": "x"}])
    with pytest.raises(OptionsError, match="empty"):
        template.render([])
    with pytest.raises(OptionsError, match="role"):
        template.render([{"content": "no role"}])


def test_chat_template_jinja_file_wins(tokenizer_dir, tmp_path):
    from phi_onnx.runtime.chat import load_chat_template

    folder = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, folder)
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert load_chat_template(folder, {"chat_template": "ignored"}) == "{{ messages[0]['content'] }}!"
    (folder / "chat_template.jinja").unlink()
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    assert load_chat_template(folder, {"chat_template": named}) == "D"


def test_trim_history_drops_oldest_exchanges_keeps_system():
    messages = [{"role": "system", "content": "s"}]
    for i in range(4):
        messages += [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}]
    messages.append({"role": "user", "content": "last"})
    kept, dropped = trim_history(messages, lambda m: 10 * len(m), budget=45)
    assert kept[0]["role"] == "system" and kept[1]["role"] == "user"
    assert [m["content"] for m in kept] == ["s", "u3", "a3", "last"]
    assert dropped == 6
    assert trim_history(messages, lambda m: 10 * len(m), budget=1000) == (messages, 0)


@pytest.fixture(scope="module")
def chat_model(make_export):
    model = phi_onnx.load(make_export("phi4mini"), device="cpu", backend="ort")  # 512-token context
    yield model
    model.close()


def test_chat_uses_the_template_and_the_end_token(chat_model, tokenizer_dir):
    reply = chat_model.chat([{"role": "user", "content": "Hi"}], max_new_tokens=8, min_new_tokens=8)
    expected = AutoTokenizer.from_pretrained(tokenizer_dir).apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert reply.prompt_tokens == len(expected)
    assert chat_model.tokenizer.token_to_id("<|end|>") in chat_model.eos_token_ids


def test_session_multi_turn_with_system_prompt(chat_model):
    session = chat_model.start_chat(system="Be brief.", max_new_tokens=6, min_new_tokens=6)
    first = session.send("First question?")
    second = session.send("Second question?")
    assert [m["role"] for m in session.messages()] == ["system", "user", "assistant", "user", "assistant"]
    assert session.history[1]["content"] == first.text
    expected = chat_model.chat_prompt_ids(session.messages()[:4])
    assert second.prompt_tokens == len(expected)
    assert second.cached_tokens >= first.prompt_tokens - 2  # the first turn's cache was reused
    session.reset()
    assert session.messages() == [{"role": "system", "content": "Be brief."}]


def test_session_drops_oldest_turns_when_the_context_fills(chat_model, caplog):
    session = chat_model.start_chat(system="Sys.", max_new_tokens=16, min_new_tokens=16)
    long_text = " ".join(["os.path.join joins paths"] * 25)  # ~100+ tokens per turn
    for _ in range(6):
        session.send(long_text)
    assert session.dropped > 0
    assert "Dropped the" in caplog.text
    messages = session.messages()
    assert messages[0] == {"role": "system", "content": "Sys."} and messages[1]["role"] == "user"
    assert len(chat_model.chat_prompt_ids(messages)) <= chat_model.context_length


def test_session_message_too_long_is_an_error_and_the_session_survives(chat_model):
    session = chat_model.start_chat(max_new_tokens=4)
    with pytest.raises(PhiOnnxError, match="512"):
        session.send(" ".join(["word"] * 1200))
    assert session.history == []
    assert session.send("ok").new_tokens >= 1


def test_stopped_reply_keeps_what_was_shown(chat_model):
    session = chat_model.start_chat(max_new_tokens=20, min_new_tokens=20)
    stream = session.stream("Tell me a story")
    shown = [next(stream) for _ in range(2)]
    stream.close()  # what Ctrl-C does in the CLI
    assert stream.result.finish_reason == "interrupted"
    assert stream.result.text == "".join(shown)
    assert session.history[-1] == {"role": "assistant", "content": "".join(shown)}
    assert session.send("Go on").new_tokens == 20


def test_stateless_chat_trims_too(chat_model):
    long_text = " ".join(["os.path.join joins paths"] * 25)
    messages = [{"role": "system", "content": "Sys."}]
    for i in range(6):
        messages += [{"role": "user", "content": long_text}, {"role": "assistant", "content": f"answer {i}"}]
    messages.append({"role": "user", "content": "last question"})
    stream = chat_model.chat_stream(messages, max_new_tokens=8)
    result = stream.finish()
    assert stream.dropped_messages > 0
    assert result.prompt_tokens + 8 <= chat_model.context_length
    kept, _ = chat_model.fit_chat(messages, 8)
    assert kept[0]["role"] == "system" and kept[-1]["content"] == "last question"
