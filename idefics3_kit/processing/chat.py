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

import dataclasses
import functools
import json
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

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=16)
def compile_template(source: str):
    """Compile once per template string (templates are immutable data)."""
    import jinja2

    try:
        return _environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ValueError(f"chat template does not parse: {exc} (line {exc.lineno})") from None


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


def normalize_messages(messages) -> list[dict]:
    """Messages as the template sees them; OpenAI ``image_url`` items become ``image`` items."""
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"a conversation must be a list of messages, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        message = _drop_none(dict(message))
        content = message.get("content")
        if isinstance(content, list):
            message["content"] = [_openai_image(item) for item in content]
        out.append(plain_data(message))
    return out


def _openai_image(item):
    if isinstance(item, Mapping) and item.get("type") == "image_url" and "image_url" in item:
        info = item["image_url"]
        return {"type": "image", "url": info.get("url", "") if isinstance(info, Mapping) else info}
    return item


def render(template: str, messages, add_generation_prompt: bool = False, **variables) -> str:
    """One conversation -> prompt string."""
    import jinja2

    try:
        return compile_template(template).render(messages=normalize_messages(messages), tools=None,
                                                 documents=None, add_generation_prompt=add_generation_prompt,
                                                 **plain_data(variables))
    except jinja2.exceptions.TemplateError as exc:
        raise ValueError(f"chat template failed: {exc}") from None


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
