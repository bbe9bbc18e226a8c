"""Chat templates: rendered with jinja2 the way transformers renders them, so strings are identical.

transformers compiles a template in an ``ImmutableSandboxedEnvironment`` with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}``
block tag, a ``tojson`` filter that does not escape HTML, and the globals ``raise_exception``
and ``strftime_now``; the variables are the messages, ``add_generation_prompt`` and the
tokenizer's named special tokens (``bos_token``, ...). Messages are reduced to plain JSON data
first (keys with None values dropped, images replaced by inert placeholders), because a template
only looks at whether an image item is there. Everything here follows that recipe.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import signal
import threading
import time
from datetime import datetime
from typing import Any, Mapping

# The Idefics3 layout (reference §2.5), used when a checkpoint ships no template. It starts with
# the tokenizer's BOS (<|begin_of_text|> for Llama-3, <|im_start|> for SmolLM2 tokenizers).
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


# Bounds on the work one render may do: a chat template comes with a checkpoint, i.e. from a file.
MAX_RANGE_ITEMS = 1_000_000  # items that range() may yield over a whole render
MAX_SEQUENCE = 1_000_000  # length of a string or list made by * (and size of a number made by **)
MAX_OUTPUT_CHARS = 10_000_000  # characters a render may produce
MAX_SECONDS = 10.0  # wall time of one render


class TemplateLimitError(ValueError):
    """A chat template exceeded the work a render may do (see the MAX_* bounds)."""


class _Budget:
    """The work left to the render in progress (one per render, shared by its range() calls)."""

    def __init__(self):
        self.range_items = MAX_RANGE_ITEMS
        self.deadline = time.monotonic() + MAX_SECONDS

    def spend(self, n: int) -> None:
        self.range_items -= n
        if self.range_items < 0:
            raise TemplateLimitError(f"chat template loops over more than {MAX_RANGE_ITEMS} range() items")
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"chat template ran longer than {MAX_SECONDS:.0f} s")


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def _counted_range(*args):
    budget = _budget.get()
    for value in range(*args):
        if budget is not None:
            budget.spend(1)
        yield value


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body (assistant masks are not tracked)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """transformers' sandbox, with ``*`` and ``**`` that cannot build huge values."""

        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, times in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > MAX_SEQUENCE:
                        raise TemplateLimitError(f"chat template builds a sequence of {len(seq) * times} items "
                                                 f"(at most {MAX_SEQUENCE})")
            if operator == "**" and isinstance(left, (int, float)) and isinstance(right, (int, float)):
                if abs(right) > 64 and abs(left) > 1:
                    raise TemplateLimitError(f"chat template raises {left} to the power {right}")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["range"] = _counted_range
    return env


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """Compile once per template string (templates are immutable data)."""
    import jinja2

    if not isinstance(source, str):
        raise ValueError(f"a chat template must be a string, got {type(source).__name__}")
    try:
        return _environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ValueError(f"chat template does not parse: {exc} (line {exc.lineno})") from None
    except (RecursionError, MemoryError) as exc:
        raise ValueError(f"chat template does not parse: {type(exc).__name__}") from None


def plain_data(value: Any) -> Any:
    """JSON-like copy of ``value``; anything else (images, arrays, tensors) becomes ``"<TypeName>"``."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, int, float):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalars
        return plain_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


def _drop_none(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


ROLES = ("system", "user", "assistant", "tool")
CONTENT_TYPES = ("text", "image", "image_url")


def normalize_messages(messages) -> list[dict]:
    """Messages as the template sees them, checked; OpenAI ``image_url`` items become ``image`` items.

    A message is ``{"role": str, "content": str | [items]}`` (content may be missing for an
    assistant turn with tool calls); an item is ``{"type": "text", "text": str}``, an image item,
    or OpenAI's ``{"type": "image_url", ...}``. Anything else is a ValueError naming the message.
    """
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"a conversation must be a list of messages, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        message = _drop_none(dict(message))
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {i}: 'role' must be a non-empty string ({', '.join(ROLES)}), got {role!r}")
        content = message.get("content")
        if isinstance(content, list):
            message["content"] = [_openai_image(_check_item(item, i, k)) for k, item in enumerate(content)]
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"message {i}: 'content' must be a string or a list of items, got "
                             f"{type(content).__name__}")
        out.append(plain_data(message))
    return out


def _check_item(item, i: int, k: int):
    where = f"message {i} item {k}"
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: must be a dict such as {{'type': 'text', 'text': ...}}, got {type(item).__name__}")
    kind = item.get("type")
    if kind not in CONTENT_TYPES:
        raise ValueError(f"{where}: unknown content type {kind!r} (one of {', '.join(CONTENT_TYPES)})")
    if kind == "text" and not isinstance(item.get("text"), str):
        raise ValueError(f"{where}: 'text' must be a string, got {type(item.get('text')).__name__}")
    return item


def _openai_image(item):
    if isinstance(item, Mapping) and item.get("type") == "image_url" and "image_url" in item:
        info = item["image_url"]
        return {"type": "image", "url": info.get("url", "") if isinstance(info, Mapping) else info}
    return item


CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker, cut off after rendering


def template_variables(template: str) -> set[str]:
    """The names a template reads from its context (transformers routes other keywords of
    apply_chat_template to the processor call)."""
    return set(_template_variables(template))


@functools.lru_cache(maxsize=16)
def _template_variables(template: str) -> frozenset[str]:
    """Cached: parsing the template costs more than rendering it (a server asks once per request)."""
    import jinja2.meta

    compile_template(template)  # a template that does not parse fails here, with our message
    return frozenset(jinja2.meta.find_undeclared_variables(_environment().parse(template)))


def render(template: str, messages, add_generation_prompt: bool = False, continue_final_message: bool | str = False,
           tools=None, documents=None, **variables) -> str:
    """One conversation -> prompt string, within the bounds above (``TemplateLimitError``); any
    error raised inside the template is a ValueError saying so.

    ``continue_final_message`` (True, or the name of the field to continue): the prompt stops
    right after the last message's text, without its end-of-turn, as transformers does it (the
    text is tagged, the template rendered, the output cut at the tag)."""
    messages = normalize_messages(messages)
    if continue_final_message:
        final = _tag_final_message(messages, template, continue_final_message)
    compiled = compile_template(template)
    context = dict(messages=messages, tools=plain_data(tools), documents=plain_data(documents),
                   add_generation_prompt=add_generation_prompt, **plain_data(variables))
    budget = _Budget()
    token = _budget.set(budget)
    pieces, size = [], 0
    try:
        with _hard_deadline(MAX_SECONDS):
            for piece in compiled.generate(**context):  # the render's own chunks: each one checks the budget
                size += len(piece)
                if size > MAX_OUTPUT_CHARS:
                    raise TemplateLimitError(f"chat template writes more than {MAX_OUTPUT_CHARS} characters")
                budget.spend(0)
                pieces.append(piece)
    except TemplateLimitError:
        raise
    except (RecursionError, MemoryError) as exc:
        raise ValueError(f"chat template failed: {type(exc).__name__} (a template that recurses or grows without "
                         "bound)") from None
    except Exception as exc:  # noqa: BLE001 - whatever a template raises, say it came from the template
        import jinja2

        kind = "" if isinstance(exc, jinja2.exceptions.TemplateError) and type(exc).__name__ == "TemplateError" \
            else f"{type(exc).__name__}: "
        raise ValueError(f"chat template failed: {kind}{exc}") from None
    finally:
        _budget.reset(token)
    text = "".join(pieces)
    return _cut_at_tag(text, final) if continue_final_message else text


def _tag_final_message(messages: list[dict], template: str, field) -> str:
    """Append the continue tag to the last message's text (its last text item); returns that text."""
    if not messages:
        raise ValueError("continue_final_message is set but the conversation is empty")
    field = field if isinstance(field, str) else "content"
    final = messages[-1].get(field)
    if final is None:
        raise ValueError(f"continue_final_message is set but the final message has no {field!r} to continue")
    if field not in template:
        raise ValueError(f"continue_final_message is set to {field!r} but the chat template never reads it")
    if isinstance(final, list):
        for item in reversed(final):
            if isinstance(item, dict) and "text" in item:
                text = item["text"]
                item["text"] = text + CONTINUE_TAG
                return text
        raise ValueError("continue_final_message is set but the final message has no text to continue")
    messages[-1][field] = final + CONTINUE_TAG
    return final


def _cut_at_tag(rendered: str, final: str) -> str:
    tag = CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise ValueError("continue_final_message is set but the chat template does not write the final message "
                         "as given (it removed part of it)")
    at = rendered.rindex(tag)
    if rendered[at:at + len(CONTINUE_TAG)] == CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()  # the template trimmed the trailing space


@contextlib.contextmanager
def _hard_deadline(seconds: float):
    """Interrupt a render that computes silently for too long (loops that write nothing): a timer
    signal, in the main thread when no other timer is running. Elsewhere the budget's checks at
    each range() item and each written chunk are the bound."""
    usable = (threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
              and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0))
    if not usable:
        yield
        return

    def stop(signum, frame):
        raise TemplateLimitError(f"chat template ran longer than {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def images_in_messages(messages) -> list:
    """The image objects of the ``image`` items, in order (the ``image``, ``url`` or ``path`` key)."""
    found = []
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, list):
            continue
        for item in content:
            if not isinstance(item, Mapping) or item.get("type") not in ("image", "image_url"):
                continue
            source = next((item[k] for k in ("image", "path", "url") if item.get(k) is not None), None)
            if source is None and item.get("type") == "image_url":
                info = item.get("image_url")
                source = info.get("url") if isinstance(info, Mapping) else info
            if source is not None:
                found.append(source)
    return found
