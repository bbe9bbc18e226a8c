"""A chat template comes from a file: its render is sandboxed and bounded, and messages are checked."""

from __future__ import annotations

import threading
import time

import pytest

from idefics3_kit.processing import chat

USER = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]


@pytest.mark.parametrize("template,match", [
    ("{% for i in range(10**12) %}{% endfor %}", "range"),
    ("{% for i in range(10**6) %}{% for j in range(10**6) %}{% endfor %}{% endfor %}", "range"),
    ("{{ 'x' * 10**9 }}", "sequence"),
    ("{{ [1] * 10**9 }}", "sequence"),
    ("{{ 10 ** 100000000 }}", "power"),
    ("{% set n = 10 %}{{ n ** (n * 10000000) }}", "power"),
    ("{% for i in range(999999) %}{{ 'abcdefghijklmnop' }}{% endfor %}", "characters"),
])
def test_runaway_templates_stop_with_a_clear_error(template, match):
    start = time.monotonic()
    with pytest.raises(chat.TemplateLimitError, match=match):
        chat.render(template, USER)
    assert time.monotonic() - start < chat.MAX_SECONDS + 5


def test_a_silent_loop_hits_the_time_limit(monkeypatch):
    """A loop that writes nothing and calls no range(): the timer signal stops it (main thread)."""
    monkeypatch.setattr(chat, "MAX_SECONDS", 0.5)
    template = "{% set ns = namespace(x=[1]) %}{% for a in ns.x * 100000 %}{% for b in ns.x * 100000 %}" \
               "{% endfor %}{% endfor %}"
    with pytest.raises(chat.TemplateLimitError, match="longer than"):
        chat.render(template, USER)


def test_the_budget_also_bounds_renders_off_the_main_thread():
    errors = []

    def work():
        try:
            chat.render("{% for i in range(10**12) %}{% endfor %}", USER)
        except chat.TemplateLimitError as exc:
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert not thread.is_alive() and len(errors) == 1


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # the sandbox refuses attribute escapes
    "{{ cycler.__init__.__globals__ }}",
    "{{ messages.append(1) }}",  # immutable sandbox
    "{{ raise_exception('bad turn order') }}",
    "{{ undefined_function() }}",
    "{% for %}",
])
def test_template_errors_come_out_wrapped(template):
    with pytest.raises(ValueError, match="chat template"):
        chat.render(template, USER)


def test_deep_recursion_is_a_value_error():
    template = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"
    with pytest.raises(ValueError, match="chat template"):
        chat.render(template, USER)


def test_an_ordinary_template_still_renders():
    assert chat.render(chat.DEFAULT_CHAT_TEMPLATE, USER, add_generation_prompt=True,
                       bos_token="<s>") == "<s>User: hi<end_of_utterance>\nAssistant:"


@pytest.mark.parametrize("messages,match", [
    ("hello", "must be a list of messages"),
    ([["user", "hi"]], "message 0 must be a dict"),
    ([{"content": "hi"}], "message 0: 'role' must be a non-empty string"),
    ([{"role": 3, "content": "hi"}], "'role' must be a non-empty string"),
    ([{"role": "user", "content": {"text": "hi"}}], "'content' must be a string or a list"),
    ([{"role": "user", "content": [{"type": "video"}]}], "unknown content type 'video'"),
    ([{"role": "user", "content": [{"type": "text", "text": ["a"]}]}], "'text' must be a string"),
    ([{"role": "user", "content": [{"type": "text", "text": {"a": 1}}]}], "'text' must be a string"),
    ([{"role": "user", "content": ["hi"]}], "item 0: must be a dict"),
])
def test_malformed_messages_are_named(messages, match):
    with pytest.raises(ValueError, match=match):
        chat.render(chat.DEFAULT_CHAT_TEMPLATE, messages)


def test_openai_image_url_items_count_as_images():
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                                         {"type": "text", "text": "what?"}]}]
    assert "<image>" in chat.render(chat.DEFAULT_CHAT_TEMPLATE, msgs)
