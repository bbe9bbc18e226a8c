"""Training data: conversation records, read from files or a ``datasets.Dataset``, checked up front.

A record is what TRL and the SmolVLM fine-tuning guides use::

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "..."}]}],
     "images": ["photo.jpg", ...]}

Each ``{"type": "image"}`` item takes the next entry of ``images`` (a path, relative to the data
file's folder; a ``data:`` URL; bytes; a PIL image; a datasets image dict), unless it carries its
image inline (``"path"``, ``"url"`` (a ``data:`` URL) or ``"image"``). A message's content may also
be a plain string. Roles are system, user and assistant; the loss covers every assistant turn.

Sources: a ``.jsonl`` or ``.json`` file, a ``.parquet`` file, a directory written by
``datasets.Dataset.save_to_disk``, or a ``datasets.Dataset`` passed in Python. Every record is
checked before training starts (structure, roles, an assistant turn, as many images as image
slots, image files that exist and open); a bad one is an error naming the file and the record,
or, with ``skip_bad_records``, a counted warning.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..processing.images import is_image, to_rgb

logger = logging.getLogger("idefics3_kit.train")

ROLES = ("system", "user", "assistant")
IMAGE_KEYS = ("image", "path", "url")


class RecordError(ValueError):
    """A training record that cannot be used; the message names the file, the record and the problem,
    ``reason`` the kind of problem (what ``skip_bad_records`` counts)."""

    def __init__(self, message: str, reason: str = "bad record"):
        super().__init__(message)
        self.reason = reason


@dataclass
class Conversation:
    """One checked record: messages with normalized content, and its images in slot order."""

    messages: list[dict]  # [{"role": ..., "content": [{"type": "text", "text": ...} | {"type": "image"}]}]
    images: list = field(default_factory=list)  # image sources (paths resolved), one per image item
    where: str = ""  # "data.jsonl record 12", for errors

    def load_images(self) -> list[torch.Tensor]:
        """The images decoded to uint8 RGB [H, W, 3]; an unreadable one is a RecordError naming it."""
        out = []
        for k, source in enumerate(self.images):
            try:
                out.append(to_rgb(source, f"{self.where}, image {k}"))
            except ValueError as exc:
                raise RecordError(str(exc), reason="unreadable image") from None
        return out


# ---- reading records ------------------------------------------------------------------------------


@dataclass
class RecordSource:
    """Raw records and where they came from (the folder relative image paths start from)."""

    records: Sequence[Mapping[str, Any]]
    name: str
    base_dir: str | None

    def __len__(self) -> int:
        return len(self.records)


def open_source(source, where: str = "data.source") -> RecordSource:
    """A RecordSource from a file, a ``save_to_disk`` directory or a ``datasets.Dataset``."""
    if _is_hf_dataset(source):
        return RecordSource(source, f"the datasets.Dataset ({len(source)} records)", None)
    if isinstance(source, (list, tuple)):
        return RecordSource(list(source), "the records passed in Python", None)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"{where}: expected a data file, a directory saved with datasets' save_to_disk or a "
                         f"datasets.Dataset, got {type(source).__name__}")
    path = os.fspath(source)
    if os.path.isdir(path):
        return RecordSource(_load_from_disk(path), path, path)
    if not os.path.exists(path):
        raise ValueError(f"{where}: no such file or directory: {path}")
    base = os.path.dirname(os.path.abspath(path))
    if path.endswith(".jsonl"):
        return RecordSource(_read_jsonl(path), path, base)
    if path.endswith(".json"):
        return RecordSource(_read_json_records(path), path, base)
    if path.endswith(".parquet"):
        return RecordSource(_read_parquet(path), path, base)
    raise ValueError(f"{where}: {path}: unknown data format (expected .jsonl, .json, .parquet or a directory saved "
                     f"with datasets' save_to_disk)")


def _is_hf_dataset(obj) -> bool:
    return type(obj).__name__ == "Dataset" and type(obj).__module__.startswith("datasets")


def _read_jsonl(path: str) -> list:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RecordError(f"{path} line {number}: not valid JSON ({exc})", reason="not valid JSON") from None
    return records


def _read_json_records(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise RecordError(f"{path}: expected a JSON list of records (or {{\"data\": [...]}}), got "
                          f"{type(data).__name__}")
    return data


def _read_parquet(path: str):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs the datasets package (pip install idefics3_kit[train])") \
            from None
    return datasets.Dataset.from_parquet(path)


def _load_from_disk(path: str):
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path}: a directory of data needs the datasets package (pip install "
                         "idefics3_kit[train])") from None
    try:
        return datasets.load_from_disk(path)
    except FileNotFoundError as exc:
        raise ValueError(f"{path}: not a directory written by datasets' save_to_disk ({exc})") from None


# ---- checking one record --------------------------------------------------------------------------


def parse_record(record, where: str, base_dir: str | None = None) -> Conversation:
    """A checked Conversation from one raw record, or a RecordError naming ``where``."""
    if not isinstance(record, Mapping):
        raise RecordError(f"{where}: a record must be an object with 'messages', got {type(record).__name__}", reason="not an object")
    messages = record.get("messages")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RecordError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects, got "
                          f"{_short(messages)}", reason="no messages")
    pool = record.get("images")
    if pool is None:
        pool = []
    if not isinstance(pool, (list, tuple)):
        raise RecordError(f"{where}: 'images' must be a list of image paths, got {_short(pool)}", reason="bad images")
    pool = list(pool)
    normalized, images, slots = [], [], 0
    for m, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise RecordError(f"{where}: message {m} must be an object, got {type(message).__name__}", reason="bad message")
        role = message.get("role")
        if role not in ROLES:
            raise RecordError(f"{where}: message {m}: 'role' must be one of {list(ROLES)}, got {_short(role)}", reason="bad role")
        content = []
        for i, item in enumerate(_items(message.get("content"), f"{where}: message {m}")):
            kind = item.get("type")
            if kind == "text":
                if not isinstance(item.get("text"), str):
                    raise RecordError(f"{where}: message {m} item {i}: 'text' must be a string, got "
                                      f"{_short(item.get('text'))}", reason="bad text")
                content.append({"type": "text", "text": item["text"]})
            elif kind == "image":
                inline = next((item[k] for k in IMAGE_KEYS if item.get(k) is not None), None)
                if inline is None:
                    if slots >= len(pool):
                        raise RecordError(f"{where}: more <image> slots than images: message {m} item {i} is image "
                                          f"slot {slots + 1} but 'images' holds {len(pool)}", reason="more <image> slots than images")
                    inline = pool[slots]
                    slots += 1
                images.append(_resolve(inline, base_dir, f"{where}: message {m} item {i}"))
                content.append({"type": "image"})
            else:
                raise RecordError(f"{where}: message {m} item {i}: unknown content type {_short(kind)} "
                                  "(text or image)", reason="unknown content type")
        normalized.append({"role": role, "content": content})
    if slots < len(pool):
        raise RecordError(f"{where}: 'images' holds {len(pool)} images but the messages have {slots} <image> slots", reason="more images than <image> slots")
    if not any(m["role"] == "assistant" and m["content"] for m in normalized):
        raise RecordError(f"{where}: no assistant turn: there is nothing to learn from this record", reason="no assistant turn")
    return Conversation(normalized, images, where)


def _items(content, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, (list, tuple)):
        raise RecordError(f"{where}: 'content' must be a string or a list of items, got {_short(content)}", reason="bad content")
    for i, item in enumerate(content):
        if not isinstance(item, Mapping):
            raise RecordError(f"{where} item {i}: must be an object such as {{'type': 'text', 'text': ...}}, got "
                              f"{_short(item)}", reason="bad content")
    return list(content)


def _resolve(source, base_dir: str | None, where: str):
    """A path made absolute (relative to the data file's folder) and checked to exist; other
    sources (data: URLs, bytes, PIL images, datasets image dicts) as they are."""
    if isinstance(source, Mapping) and ("bytes" in source or "path" in source):  # datasets' Image feature
        if source.get("bytes"):
            return source["bytes"]
        source = source.get("path")
    if isinstance(source, (str, os.PathLike)) and not str(source).startswith("data:"):
        path = os.fspath(source)
        if base_dir is not None and not os.path.isabs(path):
            path = os.path.join(base_dir, path)
        if not os.path.isfile(path):
            raise RecordError(f"{where}: image file not found: {path}", reason="image file not found")
        return path
    if not is_image(source):
        raise RecordError(f"{where}: not an image: {_short(source)} (a path, a data: URL, bytes or a PIL image)", reason="not an image")
    return source


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---- the dataset the trainer reads ------------------------------------------------------------------


class ConversationDataset(torch.utils.data.Dataset):
    """Checked conversations; ``dataset[i]`` decodes record i's images (in a DataLoader worker).

    ``lengths`` (token counts, set by ``collator.measure_dataset``) serve length grouping and
    the ``max_length`` rule.
    """

    ordered: bool  # keep the data's own order (train.sampling); set where the dataset is made (train.sources)

    def __init__(self, conversations: list[Conversation], name: str, skipped: dict | None = None,
                 skip_bad_records: bool = False):
        self.conversations = conversations
        self.name = name
        self.lengths: list[int] | None = None
        self.skipped: dict[str, int] = dict(skipped or {})
        self.skip_bad_records = skip_bad_records

    @classmethod
    def from_source(cls, source, skip_bad_records: bool = False, where: str = "data.source") -> "ConversationDataset":
        raw = open_source(source, where)
        conversations: list[Conversation] = []
        skipped: dict[str, int] = {}
        for index in range(len(raw.records)):
            label = f"{raw.name} record {index}"
            try:
                conversations.append(parse_record(raw.records[index], label, raw.base_dir))
            except RecordError as exc:
                if not skip_bad_records:
                    raise
                skipped[exc.reason] = skipped.get(exc.reason, 0) + 1
                logger.warning("skipping %s", exc)
        if not conversations:
            raise ValueError(f"{raw.name}: no usable training records" + (f" ({skipped} skipped)" if skipped else ""))
        return cls(conversations, raw.name, skipped, skip_bad_records)

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int):
        """(conversation, its decoded images), or (conversation, the RecordError) when an image
        cannot be decoded and bad records are skipped (the collator counts it)."""
        conversation = self.conversations[index]
        try:
            return conversation, conversation.load_images()
        except RecordError as exc:
            if not self.skip_bad_records:
                raise
            return conversation, exc

    def count_skipped(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
