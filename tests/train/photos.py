"""A small conversation dataset of the real photographs in tests/data, with written questions and
answers (some multi-turn), for the trainer's tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"

QA = {
    "chelsea.png": [("What animal is in the picture?", "A cat."),
                    ("What colour is its fur?", "Orange with dark stripes."),
                    ("Is it awake?", "Yes, its eyes are open.")],
    "camera.png": [("What is the man holding?", "A camera on a tripod."),
                   ("Is the photo in colour?", "No, it is black and white."),
                   ("Is it indoors or outdoors?", "Outdoors, on a lawn.")],
    "coffee.png": [("What is in the cup?", "Coffee."),
                   ("What is under the cup?", "A saucer."),
                   ("What is on the saucer?", "A spoon.")],
    "rocket.jpg": [("What is happening?", "A rocket is lifting off."),
                   ("What comes out below it?", "Fire and smoke."),
                   ("Is it day or night?", "Day.")],
}


def records() -> list[dict]:
    """Per photo: each question alone, and a two-turn conversation about it."""
    out = []
    for name, qa in QA.items():
        for question, answer in qa:
            out.append({"messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]}], "images": [name]})
        (q1, a1), (q2, a2) = qa[0], qa[1]
        out.append({"messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q1}]},
            {"role": "assistant", "content": [{"type": "text", "text": a1}]},
            {"role": "user", "content": [{"type": "text", "text": q2}]},
            {"role": "assistant", "content": [{"type": "text", "text": a2}]}], "images": [name]})
    return out


def write_jsonl(folder: Path, name: str = "train.jsonl", rows: list[dict] | None = None) -> Path:
    """The photos copied into ``folder`` and the records written beside them (relative paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    for photo in QA:
        if not (folder / photo).exists():
            shutil.copy(DATA / photo, folder / photo)
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in (rows if rows is not None else records())))
    return path
