"""Processor: images + prompts -> the model's batch, the way transformers' Idefics3Processor does it.

``Processor(text=..., images=...)`` converts every image to uint8 RGB (``images.py``), splits it
into tiles (the ``splitter`` component), replaces each ``<image>`` of a prompt by the token
layout of its ``TilePlan`` (reference §2.3, ``splitter.image_prompt``), tokenizes the
expanded prompts as a whole with the ``tokenizers`` library, pads them (left by default, ready
for batched generation) and returns a ``BatchFeature``:
``input_ids [B, L]``, ``attention_mask [B, L]``, ``pixel_values [B, T, 3, S, S]``,
``pixel_attention_mask [B, T, S, S]``.

Tags the tokenizer does not know as one token (``<global-img>``, ``<row_1_col_1>``, ...) are
tokenized as ordinary text.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, Sequence

import torch

from .. import files, registry
from ..hf import hub
from ..components.splitter import (FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TAG, IMAGE_TOKEN, SplitterConfig, TilePlan,
                                   image_prompt)
from ..config import VLMConfig
from . import chat
from .batch import BatchFeature, check_tensor_type
from .images import image_size, is_image, to_rgb_batch
from .tokenizer import TextTokenizer

END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"
# transformers' default when neither processor_config.json nor a model config.json says (reference §2.1)
HF_DEFAULT_IMAGE_SEQ_LEN = 169
PROCESSOR_CLASS = "Idefics3Processor"
# the files a processor's save_pretrained owns in a checkpoint folder
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json",
                   "processor_config.json", "chat_template.jinja", "chat_template.json")


class Processor:
    """Splitter + tokenizer + prompt expansion + chat template for Idefics3 / SmolVLM checkpoints."""

    image_token = IMAGE_TOKEN
    fake_image_token = FAKE_IMAGE_TOKEN
    end_of_utterance_token = END_OF_UTTERANCE_TOKEN
    global_image_tag = GLOBAL_IMAGE_TAG

    def __init__(self, tokenizer: TextTokenizer, splitter=None, image_seq_len: int = HF_DEFAULT_IMAGE_SEQ_LEN,
                 chat_template: str | None = None, padding_side: str = "left"):
        if not isinstance(image_seq_len, int) or image_seq_len < 1:
            raise ValueError(f"image_seq_len must be a positive integer, got {image_seq_len!r}")
        self.tokenizer = tokenizer
        self.splitter = splitter if splitter is not None else registry.create("splitter", "idefics3")
        self.image_seq_len = image_seq_len
        self.chat_template = chat_template
        self.padding_side = _check_side(padding_side, "padding_side")
        tokenizer.padding_side = self.padding_side  # tools that pad with processor.tokenizer pad the same way
        if tokenizer.chat_template is None:
            tokenizer.chat_template = self.template  # and its apply_chat_template renders the same prompt
        tokenizer.add_special_tokens([FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE_TOKEN])
        self.image_token_id = tokenizer.token_to_id(IMAGE_TOKEN)
        self.fake_image_token_id = tokenizer.token_to_id(FAKE_IMAGE_TOKEN)
        self.end_of_utterance_token_id = tokenizer.token_to_id(END_OF_UTTERANCE_TOKEN)

    def __repr__(self) -> str:
        cfg = self.splitter.config
        return (f"Processor(longest_edge={cfg.longest_edge}, tile_size={cfg.tile_size}, "
                f"splitting={cfg.do_image_splitting}, image_seq_len={self.image_seq_len}, "
                f"vocab={len(self.tokenizer)}, image_token_id={self.image_token_id}, "
                f"padding_side={self.padding_side!r})")

    # ---- loading and saving -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, image_seq_len: int | None = None,
                        padding_side: str = "left", *, revision: str | None = None, cache_dir=None,
                        local_files_only: bool | None = None, token=None, **splitter_overrides) -> "Processor":
        """Load from a checkpoint folder or a Hub id (tokenizer.json, image settings, chat template;
        ``revision``, ``cache_dir``, ``local_files_only``, ``token`` as in transformers).

        Image settings come from ``processor_config.json["image_processor"]`` (transformers v5) or
        ``preprocessor_config.json``. Tokens per tile come from the model's ``config.json`` when the
        folder has one (the number the model needs; a different ``image_seq_len`` in
        processor_config.json is an error naming both), else from processor_config.json, else
        transformers' default of 169. Keyword arguments override ``image_seq_len``, ``padding_side``
        and any ``SplitterConfig`` field.
        """
        for key in ("trust_remote_code", "use_fast"):  # transformers' flags: only their neutral value here
            if splitter_overrides.get(key, None) not in (None, False if key == "trust_remote_code" else True):
                raise ValueError(f"Processor.from_pretrained: {key}={splitter_overrides[key]!r} is not supported")
            splitter_overrides.pop(key, None)
        try:
            path = hub.locate(path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                              token=token, what="processor checkpoint folder")
        except FileNotFoundError as exc:
            raise ValueError(str(exc)) from None
        tokenizer = TextTokenizer.from_dir(path)
        if tokenizer.token_to_id(IMAGE_TOKEN) is None:
            raise ValueError(f"{path}/tokenizer.json has no {IMAGE_TOKEN} token, so it is not an Idefics3 processor's "
                             f"tokenizer; to use another model's tokenizer build Processor(TextTokenizer.from_dir(...), "
                             f"...), which adds the image tokens")
        proc_cfg = files.read_json_if_exists(os.path.join(path, "processor_config.json"), "processor_config.json")
        splitter_cfg = SplitterConfig.from_hf(image_settings(path, proc_cfg)).replace(**splitter_overrides)
        model = _model_config(path)
        seq_len = image_seq_len or checkpoint_image_seq_len(path, proc_cfg, model)
        template = load_chat_template(path, proc_cfg, tokenizer.config)
        processor = cls(tokenizer, registry.create("splitter", "idefics3", splitter_cfg), int(seq_len),
                        template, padding_side)
        if model is not None and processor.image_token_id != model.image_token_id:
            raise ValueError(f"{path}: the tokenizer's {IMAGE_TOKEN} is id {processor.image_token_id} but the model "
                             f"(config.json) expects image_token_id {model.image_token_id}")
        return processor

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json, preprocessor_config.json, processor_config.json
        and chat_template.jinja, which transformers' Idefics3Processor loads back, atomically (the
        processor files are all old or all new; other files in the folder stay)."""
        with files.atomic_directory(os.fspath(directory), lambda name: name in PROCESSOR_FILES) as tmp:
            self.tokenizer.save(tmp, {"processor_class": PROCESSOR_CLASS, "padding_side": self.padding_side})
            image_cfg = {**self.splitter.config.to_hf(), "processor_class": PROCESSOR_CLASS}
            files.write_json(os.path.join(tmp, "preprocessor_config.json"), image_cfg, sort_keys=True)
            files.write_json(os.path.join(tmp, "processor_config.json"),
                             {"image_seq_len": self.image_seq_len, "processor_class": PROCESSOR_CLASS}, sort_keys=True)
            files.write_text(os.path.join(tmp, "chat_template.jinja"), self.template)

    # ---- planning -----------------------------------------------------------------------------
    def expand_image(self, rows: int, cols: int) -> str:
        """The prompt text that replaces one ``<image>`` for an image of ``rows``×``cols`` tiles."""
        return image_prompt(rows, cols, self.image_seq_len)

    def plan(self, width, height: int | None = None, **overrides) -> TilePlan:
        """Rows, cols, tiles and token cost of an image of ``width``×``height`` (PIL's order).

        ``width`` may also be an image (PIL, array, path) whose size is used. Cheap: no pixels are
        resized. ``overrides`` are ``SplitterConfig`` fields (e.g. ``do_image_splitting=False``).
        """
        if height is None:
            width, height = image_size(width)
        tiles = self.splitter.plan(int(height), int(width), **overrides)
        expansion = self.tokenizer.encode(tiles.prompt_text(self.image_seq_len), add_special_tokens=False)
        return dataclasses.replace(tiles, image_seq_len=self.image_seq_len, prompt_tokens=len(expansion))

    # ---- the main call ------------------------------------------------------------------------
    def __call__(self, text=None, images=None, **kwargs) -> BatchFeature:
        """transformers' ``processor(images=..., text=...)``: see ``process`` for the arguments.
        transformers' positional order (images, text) is recognised too, and its nested
        ``text_kwargs``/``images_kwargs``/``common_kwargs`` dicts are flattened."""
        if _looks_like_text(images) and not _looks_like_text(text):
            text, images = images, text
        return self.process(text, images, **_flatten_call_kwargs(kwargs))

    def process(self, text: str | Sequence[str] | None = None, images=None, *, return_tensors: str | None = "pt",
                 padding: bool | str = True, padding_side: str | None = None, truncation: bool = False,
                 max_length: int | None = None, pad_to_multiple_of: int | None = None,
                 add_special_tokens: bool = True, pixel_dtype: torch.dtype = torch.float32,
                 image_seq_len: int | None = None, device=None, return_offsets_mapping: bool = False,
                 return_attention_mask: bool = True, return_row_col_info: bool = False,
                 **image_overrides) -> BatchFeature:
        """Tokenize prompts and split images into one batch (see the module docstring).

        ``images``: one image, a flat list (shared out over the prompts by their ``<image>``
        counts), or one list per prompt (possibly empty). ``image_overrides``: ``SplitterConfig``
        fields, or the transformers spellings ``size={"longest_edge": n}``,
        ``max_image_size={"longest_edge": n}``, ``do_image_splitting``, ``image_mean``, ``image_std``.
        Every image is converted and checked before any pixel work, so an error leaves nothing half-done.
        ``device="cuda"`` preprocesses the images on the GPU with the CUDA kernel when it is built
        (bit-equal to the CPU op) and returns every tensor on that device.
        ``image_seq_len`` is accepted only when it equals the processor's (transformers silently
        ignores a different one; the model needs the checkpoint's value).
        ``return_tensors``: "pt" (default), "np" or None (lists). ``return_row_col_info``: also
        ``rows`` and ``cols``, per sample one entry per image (transformers' Idefics3 option).
        transformers' nested ``text_kwargs``/``images_kwargs``/``common_kwargs`` dicts are flattened;
        its arguments that would change the result and are not implemented (``do_rescale=False``,
        ``resample`` other than LANCZOS, ...) are refused by name.
        ``return_offsets_mapping``: also ``offset_mapping`` [B, L, 2], each token's (start, end)
        character span in the prompt *as given* (before ``<image>`` expansion): every token of an
        image's block gets the span of its ``<image>``; special tokens and padding get (0, 0). The
        trainer uses it to label the assistant's turns.
        """
        if image_seq_len is not None and image_seq_len != self.image_seq_len:
            raise ValueError(f"image_seq_len={image_seq_len} differs from this processor's {self.image_seq_len} "
                             f"(processor_config.json); the model expects that many tokens per tile. Build the "
                             f"processor with Processor.from_pretrained(path, image_seq_len={image_seq_len}) instead")
        check_tensor_type(return_tensors)
        _splitter_overrides(image_overrides)  # unknown keywords fail even when there are no images
        prompts = _as_prompts(text)
        batch_images = self._layout_images(images, prompts)
        _check_counts(prompts, batch_images)
        if batch_images is not None and not any(batch_images):
            batch_images = None  # [[], []] with image-free prompts: a text-only batch
        result = BatchFeature()
        result.image_plans = []
        prepared = None
        if batch_images is not None:  # convert and plan first: bad images fail before any work
            settings = self.splitter.settings(**_splitter_overrides(image_overrides))
            rgb = to_rgb_batch(batch_images, settings.pixel_limit())
            prepared = self.splitter.prepare(rgb, **_splitter_overrides(image_overrides))
            result.image_plans = prepared.plans
        if prompts is not None:  # tokenize next: a refused truncation fails before the pixel work
            expansions = [self._expand_prompt(p, result.image_plans[i] if prepared else [])
                          for i, p in enumerate(prompts)]
            result.update(self._tokenize(expansions, result.image_plans, return_tensors, padding,
                                         padding_side or self.padding_side, truncation, max_length,
                                         pad_to_multiple_of, add_special_tokens, return_offsets_mapping))
        if prepared is not None:
            split = self.splitter.fill(prepared, pixel_dtype, device=device)
            result["pixel_values"] = split.pixel_values
            result["pixel_attention_mask"] = split.pixel_attention_mask
        if not return_attention_mask:
            result.pop("attention_mask", None)
        if return_row_col_info:
            result["rows"] = [[p.rows for p in plans] for plans in result.image_plans] if prepared else []
            result["cols"] = [[p.cols for p in plans] for plans in result.image_plans] if prepared else []
        if device is not None:
            result.to(device)
        if return_tensors == "np":
            for key in ("pixel_values", "pixel_attention_mask"):
                if key in result:
                    result[key] = result[key].cpu().numpy()
        return result

    def _layout_images(self, images, prompts: list[str] | None) -> list[list[Any]] | None:
        """One list of images per prompt (the reference's nesting rules, §1.2 and §2.2)."""
        if images is None:
            return None
        if is_image(images):
            return [[images]]
        if not isinstance(images, (list, tuple)):
            raise ValueError(f"images must be an image, a list of images or a list of lists of images, "
                             f"got {type(images).__name__}")
        if len(images) == 0:
            return None if prompts is None else [[] for _ in prompts]
        if all(is_image(im) for im in images):
            if prompts is None:
                return [list(images)]
            counts = [p.count(IMAGE_TOKEN) for p in prompts]
            starts = [0, *accumulate(counts)]
            nested = [list(images[starts[i]:starts[i + 1]]) for i in range(len(prompts))]
            return nested + ([list(images[starts[-1]:])] if len(images) > starts[-1] else [])
        for i, sample in enumerate(images):
            if not isinstance(sample, (list, tuple)) or not all(is_image(im) for im in sample):
                raise ValueError(f"images: sample {i} must be a list of images (PIL, numpy, torch, path or bytes), "
                                 f"got {type(sample).__name__}; don't mix images and lists at one level")
        return [list(sample) for sample in images]

    def _expand_prompt(self, prompt: str, plans: list[TilePlan]) -> "_Expansion":
        """The prompt with each ``<image>`` replaced by its image's token layout, and where each
        piece of the expanded text came from."""
        pieces = prompt.split(IMAGE_TOKEN)
        out, segments = [pieces[0]], [(0, 0, len(pieces[0]), False)]
        expanded_at, original_at = len(pieces[0]), len(pieces[0])
        for plan, piece in zip(plans, pieces[1:]):
            block = plan.prompt_text(self.image_seq_len)
            segments.append((expanded_at, original_at, len(block), True))
            expanded_at, original_at = expanded_at + len(block), original_at + len(IMAGE_TOKEN)
            segments.append((expanded_at, original_at, len(piece), False))
            expanded_at, original_at = expanded_at + len(piece), original_at + len(piece)
            out += [block, piece]
        return _Expansion("".join(out), segments)

    def _tokenize(self, expansions, plans, return_tensors, padding, side, truncation, max_length,
                  pad_to_multiple_of, add_special_tokens, return_offsets) -> dict:
        # Whole expanded prompts through the tokenizer, truncated as the tokenizers library does it
        # (on each encoding: the shared tokenizer is never mutated, concurrent calls stay safe).
        limit = max_length if truncation and max_length is not None else None
        ids, offsets = self.tokenizer.encodings([e.text for e in expansions], add_special_tokens, limit)
        if limit is not None:
            self._check_truncation(ids, plans, max_length)
        side = _check_side(side, "padding_side")
        input_ids, attention_mask = self._pad(ids, padding, side, max_length, pad_to_multiple_of)
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if return_offsets:
            mapped = [[e.original_span(*span) for span in row] for e, row in zip(expansions, offsets)]
            out["offset_mapping"] = self._pad_rows(mapped, input_ids, side, (0, 0))
        if return_tensors is None:
            return out
        if len({len(row) for row in input_ids}) > 1:
            raise ValueError(f"prompts have different lengths {[len(r) for r in input_ids]}: pass padding=True "
                             f"to return tensors")
        tensors = {k: torch.tensor(v, dtype=torch.long).reshape(len(input_ids), len(input_ids[0]), *([2] * (
            k == "offset_mapping"))) for k, v in out.items()}
        return tensors if return_tensors == "pt" else {k: v.numpy() for k, v in tensors.items()}

    @staticmethod
    def _pad_rows(rows, padded_ids, side, value):
        """``rows`` padded like ``padded_ids`` (same lengths, same side)."""
        out = []
        for row, target in zip(rows, padded_ids):
            pad = [value] * (len(target) - len(row))
            out.append(pad + row if side == "left" else row + pad)
        return out

    def _check_truncation(self, ids, plans, max_length: int) -> None:
        """Refuse a truncation that cut into any image block (the model would see broken images)."""
        for i, row in enumerate(ids):
            sample_plans = plans[i] if plans else []
            want_images = sum(p.tiles for p in sample_plans) * self.image_seq_len
            want_fakes = sum(p.fake_tokens for p in sample_plans)
            got_images = row.count(self.image_token_id)
            got_fakes = row.count(self.fake_image_token_id)
            if (got_images, got_fakes) != (want_images, want_fakes):
                raise ValueError(f"truncation to max_length={max_length} would cut image tokens of prompt {i}: "
                                 f"its {len(sample_plans)} image(s) need {want_images} <image> tokens, "
                                 f"{got_images} would remain; raise max_length or shorten the text")

    def _pad(self, ids, padding, side, max_length, pad_to_multiple_of):
        return self.tokenizer.pad_ids(ids, padding, side, max_length, pad_to_multiple_of)

    # ---- chat template ------------------------------------------------------------------------
    @property
    def template(self) -> str:
        """The checkpoint's chat template, or the built-in Idefics3 one."""
        return self.chat_template or chat.DEFAULT_CHAT_TEMPLATE

    def apply_chat_template(self, conversation, add_generation_prompt: bool = False, tokenize: bool = False,
                            chat_template: str | None = None, return_dict: bool = False, images=None,
                            processor_kwargs: dict | None = None, continue_final_message: bool | str = False,
                            tools=None, documents=None, return_tensors: str | None = "pt",
                            return_assistant_tokens_mask: bool = False, sanitize_control_tokens: bool = False,
                            load_audio_from_video: bool = False, **kwargs):
        """Render a conversation (or a list of them) with the chat template; optionally tokenize it,
        as transformers' ``ProcessorMixin.apply_chat_template``.

        ``tokenize=True`` processes the rendered prompt with the images of the messages' ``image``
        items (or ``images``) and, when the prompt already starts with the BOS token, does not add
        another (the double BOS of reference §2.4). It returns ``input_ids``, or the whole batch
        with ``return_dict=True``. ``continue_final_message``: the prompt ends inside the last
        message (no end-of-turn), so the model continues it. Keywords the template reads are template
        variables (``tools``, ``documents`` too); the others go to the processor call (as in
        transformers), which refuses the ones it does not know by name.
        """
        if return_assistant_tokens_mask or sanitize_control_tokens or load_audio_from_video:
            flag = next(n for n, v in (("return_assistant_tokens_mask", return_assistant_tokens_mask),
                                       ("sanitize_control_tokens", sanitize_control_tokens),
                                       ("load_audio_from_video", load_audio_from_video)) if v)
            raise ValueError(f"apply_chat_template: {flag}=True is not supported (docs/transformers.md)")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible (as in transformers): "
                             "continue the last message, or start a new assistant turn")
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and \
            isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        template = chat_template or self.template
        template_names = chat.template_variables(template)
        variables = {k: v for k, v in kwargs.items() if k in template_names}
        call_options = {k: v for k, v in kwargs.items() if k not in template_names}
        variables = {**self.tokenizer.special_tokens, **variables}
        prompts = [chat.render(template, c, add_generation_prompt, continue_final_message=continue_final_message,
                               tools=tools, documents=documents, **variables) for c in conversations]
        if not tokenize:
            if call_options:
                raise TypeError(f"apply_chat_template got arguments the template does not use: "
                                f"{', '.join(sorted(call_options))}")
            return prompts if batched else prompts[0]
        if images is None:
            found = [chat.images_in_messages(c) for c in conversations]
            images = found if any(found) else None
        options = {**dict(processor_kwargs or {}), **call_options, "return_tensors": return_tensors}
        if self.template_writes_bos(prompts[0]):
            options["add_special_tokens"] = False
        out = self(text=prompts, images=images, **options)
        return out if return_dict else out["input_ids"]

    def template_writes_bos(self, prompt: str) -> bool:
        """Whether a rendered prompt already starts with the BOS token, so the tokenizer must not
        add another (the double BOS of reference §2.4)."""
        bos = self.tokenizer.bos_token
        return bos is not None and prompt.startswith(bos)

    # ---- decoding -----------------------------------------------------------------------------
    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.reshape(-1, sequences.shape[-1]).tolist()
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


# --------------------------------------------------------------------------------------
# Helpers


@dataclass(frozen=True)
class _Expansion:
    """An expanded prompt and its pieces: (start in the expanded text, start in the prompt,
    length in the expanded text, is an image block)."""

    text: str
    segments: list

    def original_span(self, start: int, end: int) -> tuple[int, int]:
        """A character span of the expanded text as a span of the prompt (image blocks -> their ``<image>``)."""
        if start == end == 0:
            return (0, 0)
        return self._position(start, False), self._position(end, True)

    def _position(self, at: int, is_end: bool) -> int:
        for expanded_at, original_at, length, image_block in self.segments:
            inside = expanded_at <= at < expanded_at + length or (is_end and at == expanded_at + length)
            if inside and length:
                if image_block:
                    return original_at + (len(IMAGE_TOKEN) if is_end else 0)
                return original_at + (at - expanded_at)
        last = self.segments[-1]
        return last[1] + (at - last[0])


def _check_side(side: str, what: str) -> str:
    if side not in ("left", "right"):
        raise ValueError(f"{what} must be 'left' or 'right', got {side!r}")
    return side


def _as_prompts(text) -> list[str] | None:
    if text is None:
        return None
    if isinstance(text, str):
        return [text]
    if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        if not text:
            raise ValueError("`text` is an empty list: give at least one prompt")
        return list(text)
    raise ValueError("`text` must be a string or list of strings.")


def _check_counts(prompts: list[str] | None, images: list[list] | None) -> None:
    """The reference's checks, with the counts in the messages (§2.2)."""
    if prompts is None and images is None:
        raise ValueError("You must provide either `text` or `images`.")
    if prompts is None:
        return
    in_text = [p.count(IMAGE_TOKEN) for p in prompts]
    in_images = [len(s) for s in images] if images is not None else [0] * len(prompts)
    total_text, total_images = sum(in_text), sum(in_images)
    if total_images and not total_text:
        raise ValueError(f"{total_images} image(s) were passed but the text has no {IMAGE_TOKEN} token; put one "
                         f"{IMAGE_TOKEN} in the prompt where each image goes.")
    if total_text and not total_images:
        raise ValueError(f"Found {total_text} {IMAGE_TOKEN} tokens in the text but no images were passed.")
    if total_text != total_images:
        raise ValueError(f"The total number of {IMAGE_TOKEN} tokens in the prompts should be the same as the "
                         f"number of images passed. Found total {total_text} {IMAGE_TOKEN} tokens and "
                         f"{total_images} images.")
    if in_text != in_images:
        raise ValueError(f"The number of {IMAGE_TOKEN} tokens in each prompt should be the same as the number of "
                         f"images passed. Found {in_text} {IMAGE_TOKEN} tokens and {in_images} images per sample.")


# transformers' call arguments that only have a neutral value here (other values are refused by name)
_NEUTRAL_IMAGE_ARGUMENTS = {"do_convert_rgb": (True, None), "do_rescale": (True, None), "do_normalize": (True, None),
                            "do_pad": (True, None), "resample": (1, None), "return_token_type_ids": (False, None),
                            "verbose": (True, False), "return_overflowing_tokens": (False,),
                            "return_special_tokens_mask": (False,), "return_length": (False,),
                            "is_split_into_words": (False,), "stride": (0,), "return_text_replacement_offsets": (False,)}
_NESTED = ("text_kwargs", "images_kwargs", "common_kwargs", "videos_kwargs", "audio_kwargs")


def _looks_like_text(value) -> bool:
    """A prompt or a list of prompts (a string that is an image path is not passed positionally)."""
    if isinstance(value, str):
        return not os.path.exists(value)
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) for v in value) and \
        not any(os.path.exists(v) for v in value)


def _flatten_call_kwargs(kwargs: dict) -> dict:
    """transformers' nested kwargs dicts flattened; neutral values of unsupported arguments dropped."""
    flat = {}
    for key, value in kwargs.items():
        if key in _NESTED:
            if not isinstance(value, dict):
                raise TypeError(f"{key} must be a dict of processor arguments, got {type(value).__name__}")
            flat.update(value)
        else:
            flat[key] = value
    out = {}
    for key, value in flat.items():
        if key in _NEUTRAL_IMAGE_ARGUMENTS:
            if value not in _NEUTRAL_IMAGE_ARGUMENTS[key]:
                raise ValueError(f"processor call: {key}={value!r} is not supported (docs/transformers.md)")
            continue
        out[key] = value
    return out
_HF_SPELLINGS = {"size": "longest_edge", "max_image_size": "tile_size"}


def _splitter_overrides(overrides: dict) -> dict:
    """transformers' per-call spellings (size={"longest_edge": n}, ...) -> SplitterConfig fields."""
    out = {}
    fields = set(SplitterConfig.__dataclass_fields__)
    for key, value in overrides.items():
        if value is None:
            continue
        if key in _HF_SPELLINGS:
            if isinstance(value, dict):
                if "longest_edge" not in value:
                    raise ValueError(f"{key} must be {{'longest_edge': n}}, got {value}")
                value = value["longest_edge"]
            out[_HF_SPELLINGS[key]] = int(value)
        elif key in fields and key != "name":
            out[key] = value
        else:
            raise TypeError(f"unexpected keyword argument {key!r} (image settings: {', '.join(sorted(fields))})")
    return out


def _model_config(path: str) -> VLMConfig | None:
    """The model's config.json beside a processor, when there is one that loads."""
    if not os.path.lexists(os.path.join(path, "config.json")):
        return None
    try:
        return VLMConfig.from_pretrained(os.path.join(path, "config.json"))
    except (ValueError, KeyError, TypeError):
        return None  # not a VLM config.json this toolkit reads: nothing to check against


def checkpoint_image_seq_len(path: str, proc_cfg: dict, model: VLMConfig | None = None) -> int:
    """Tokens per tile for the checkpoint in ``path``: the model config's (when there is one that
    loads), checked against processor_config.json's; else processor_config.json's, else 169."""
    said = proc_cfg.get("image_seq_len")
    if said is not None and (isinstance(said, bool) or not isinstance(said, int) or said < 1):
        raise ValueError(f"{path}/processor_config.json: image_seq_len must be a positive integer, got {said!r}")
    if model is None:
        return said if said is not None else HF_DEFAULT_IMAGE_SEQ_LEN
    if said is not None and said != model.image_seq_len:
        raise ValueError(f"{path}: processor_config.json says image_seq_len={said} but the model (config.json) "
                         f"makes {model.image_seq_len} image tokens per tile; fix processor_config.json, or pass "
                         f"image_seq_len= explicitly")
    return model.image_seq_len


def image_settings(path: str, proc_cfg: dict) -> dict:
    """The image-processor dict of a checkpoint: processor_config.json's (v5) or preprocessor_config.json."""
    nested = proc_cfg.get("image_processor")
    if isinstance(nested, dict):
        return nested
    file = os.path.join(path, "preprocessor_config.json")
    if os.path.lexists(file):
        return files.read_json_object(file, "preprocessor_config.json")
    raise ValueError(f"no image settings in {path}: expected preprocessor_config.json or an 'image_processor' "
                     f"entry in processor_config.json")


def load_chat_template(path: str, proc_cfg: dict, tokenizer_cfg: dict) -> str | None:
    """chat_template.jinja, chat_template.json, processor_config.json, tokenizer_config.json, in that order."""
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.lexists(jinja_file):
        files.regular_file(jinja_file, "chat_template.jinja")
        try:
            with open(jinja_file, encoding="utf-8") as f:
                return f.read()
        except UnicodeDecodeError as exc:
            raise ValueError(f"{jinja_file}: not UTF-8 text ({exc})") from None
    json_file = os.path.join(path, "chat_template.json")
    if os.path.lexists(json_file):
        template = files.read_json_object(json_file, "chat_template.json").get("chat_template")
        if not isinstance(template, str):
            raise ValueError(f"chat_template.json: 'chat_template' must be a string: {json_file}")
        return template
    for source in (proc_cfg, tokenizer_cfg):
        template = source.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str):
            return template
    return None
