"""OpenAI chat-completion request bodies -> what the engine runs, with every limit checked.

``parse_chat_request`` checks the JSON fields (types, ranges, limits) and turns OpenAI messages
(``text`` and ``image_url`` parts) into the chat template's messages plus a list of decoded
images; ``prepare_inputs`` renders the template, runs the processor and checks the prompt
against the context. Both raise ``APIError`` (400/404) naming the field, never anything else
for bad input, so they are tested without a server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import APIError, bad_request
from .images import load_image
from .settings import ServeSettings

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# accepted and without effect here (metadata, switches of features we do not have, at their neutral values)
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
           "prompt_cache_key", "reasoning_effort", "modalities"}
NEUTRAL: dict[str, tuple] = {"frequency_penalty": (0, 0.0, None), "presence_penalty": (0, 0.0, None), "logprobs": (False, None),
           "top_logprobs": (None, 0), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
           "functions": (None, []), "function_call": (None, "none"), "audio": (None,), "prediction": (None,),
           "web_search_options": (None,)}
KNOWN = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
         "top_p", "seed", "stop", "n", "response_format", "top_k", "min_p", "repetition_penalty", "ignore_eos"}


@dataclass
class SamplingParams:
    """One request's decoding settings (each row of a batch has its own)."""

    max_tokens: int | None = None  # None: the server's default, bounded by the context
    temperature: float | None = None  # None: the checkpoint's generation_config; 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple = ()
    n: int = 1
    ignore_eos: bool = False  # vLLM's extension: always generate max_tokens (load tests)


@dataclass
class ChatRequest:
    messages: list  # chat-template messages: content = [{"type": "text"|"image", ...}]
    images: list  # uint8 RGB tensors, in the order of the messages' image parts
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    model: str = ""


@dataclass
class PreparedInputs:
    """One request's processed prompt: tensors [1, ...] on the CPU."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None
    pixel_attention_mask: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _number(body: dict, name: str, low: float, high: float, low_open: bool = False):
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value) or value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise bad_request(f"'{name}' must be a number in {bound}, got {value!r}", param=name)
    return float(value)


def parse_chat_request(body, settings: ServeSettings) -> ChatRequest:
    """Check a decoded JSON body and load its images (see the module docstring)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    _check_fields(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required (a string; GET /v1/models lists the served model)", param="model")
    if model != settings.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {settings.model_name!r}",
                       param="model", code="model_not_found")
    params = _sampling(body, settings)
    stream = body.get("stream", False)
    if stream not in (True, False, None):
        raise bad_request(f"'stream' must be true or false, got {stream!r}", param="stream")
    include_usage = _stream_options(body.get("stream_options"), bool(stream))
    messages, images = _messages(body.get("messages"), settings)
    return ChatRequest(messages, images, params, bool(stream), include_usage, model)


def _check_fields(body: dict) -> None:
    unknown = sorted(set(body) - KNOWN - IGNORED - set(NEUTRAL))
    if unknown:
        raise bad_request(f"unrecognized request argument(s): {', '.join(unknown)}", param=unknown[0])
    for name, neutral in NEUTRAL.items():
        if name in body and not any(body[name] == v and type(body[name]) is type(v) for v in neutral) \
                and body[name] is not None:
            raise bad_request(f"'{name}' is not supported by this server (leave it out or at its default)",
                              param=name)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad_request("'response_format' other than {\"type\": \"text\"} is not supported", param="response_format")


def _sampling(body: dict, settings: ServeSettings) -> SamplingParams:
    max_tokens = None
    for name in ("max_completion_tokens", "max_tokens"):  # the newer name wins when both are given
        value = body.get(name)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise bad_request(f"'{name}' must be an integer >= 1, got {value!r}", param=name)
        if value > settings.max_tokens_cap:
            raise bad_request(f"'{name}' is {value}, over this server's limit of {settings.max_tokens_cap} "
                              "new tokens per request", param=name)
        max_tokens = value if max_tokens is None else max_tokens
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not -2 ** 63 <= seed < 2 ** 64):
        raise bad_request(f"'seed' must be an integer, got {seed!r}", param="seed")
    n = body.get("n", 1) if body.get("n") is not None else 1
    if not _is_int(n) or n < 1 or n > settings.max_n:
        raise bad_request(f"'n' must be an integer in [1, {settings.max_n}], got {n!r}", param="n")
    if n > settings.max_batch_size:
        raise bad_request(f"'n' is {n} but this server decodes at most {settings.max_batch_size} rows together "
                          "(--max-batch-size)", param="n")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad_request(f"'ignore_eos' must be true or false, got {ignore_eos!r}", param="ignore_eos")
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise bad_request(f"'top_k' must be an integer >= 0, got {top_k!r}", param="top_k")
    return SamplingParams(
        max_tokens=max_tokens, temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0, low_open=True), top_k=top_k, min_p=_number(body, "min_p", 0.0, 1.0),
        repetition_penalty=_number(body, "repetition_penalty", 0.0, 10.0, low_open=True),
        seed=None if seed is None else int(seed) % 2 ** 63, stop=_stop(body.get("stop")), n=n,
        ignore_eos=ignore_eos)


def _stop(stop) -> tuple:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("'stop' must be a non-empty string or a list of up to 4 non-empty strings, got "
                          f"{stop!r}", param="stop")
    return tuple(stops)


def _stream_options(options, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise bad_request("'stream_options' is only allowed with 'stream': true", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise bad_request(f"'stream_options' may hold only 'include_usage', got {options!r}", param="stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad_request("'stream_options.include_usage' must be true or false", param="stream_options")
    return include


def _messages(messages, settings: ServeSettings):
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of messages", param="messages")
    out: list[dict] = []
    images: list = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content'", param="messages")
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role {role!r} is not supported (system, developer, user, assistant)",
                              param="messages")
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise bad_request(f"{where}: unsupported field(s) {', '.join(extra)} (tool calls are not supported)",
                              param="messages")
        content = _content(message.get("content"), where, ROLES[role], images, settings)
        out.append({"role": ROLES[role], "content": content})
    return out, images


def _content(content, where: str, role: str, images: list, settings: ServeSettings) -> list:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise bad_request(f"{where}.content must be a string or a non-empty list of parts", param="messages")
    parts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{at}.text must be a string", param="messages")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            if role != "user":
                raise bad_request(f"{at}: images are only allowed in user messages", param="messages")
            if len(images) >= settings.max_images_per_request:
                raise bad_request(f"{at}: more than {settings.max_images_per_request} images in one request "
                                  "(--max-images-per-request)", param="messages", code="too_many_images")
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):
                raise bad_request(f"{at}: image_url must be a string or {{'url': string}}", param="messages")
            images.append(load_image(url, settings, f"{at} (image {len(images)})"))
            parts.append({"type": "image"})
        else:
            raise bad_request(f"{at}: unsupported content part type {kind!r} (text, image_url)", param="messages")
    return parts


# ---- the prompt ------------------------------------------------------------------------------

def prepare_inputs(request: ChatRequest, processor, context: int) -> PreparedInputs:
    """Template -> processor -> [1, L] tensors; a prompt that leaves no room to answer is a 400."""
    try:
        prompt = processor.apply_chat_template(request.messages, add_generation_prompt=True)
        batch = processor(text=[prompt], images=[request.images] if request.images else None,
                          return_tensors="pt", padding=True)
    except ValueError as exc:  # e.g. an image the splitter cannot take
        raise bad_request(f"cannot process the request: {exc}", param="messages") from None
    inputs = PreparedInputs(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                            batch.get("pixel_attention_mask"))
    length = inputs.prompt_tokens
    if length >= context:
        raise bad_request(f"this model's maximum context length is {context} tokens, but the messages take "
                          f"{length} tokens; send fewer or smaller images or a shorter conversation",
                          param="messages", code="context_length_exceeded")
    wanted = request.params.max_tokens
    if wanted is not None and length + wanted > context:
        raise bad_request(f"this model's maximum context length is {context} tokens; the messages take {length} "
                          f"and max_tokens asks for {wanted} more ({length + wanted}); lower max_tokens",
                          param="max_tokens", code="context_length_exceeded")
    return inputs
