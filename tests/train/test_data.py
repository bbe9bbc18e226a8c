"""Training data: every source reads the same conversations, the labels are the assistant's turns,
bad records are named (or counted), max_length never cuts an image."""

from __future__ import annotations

import base64
import json

import pytest
import torch

import idefics3_kit as ik
from idefics3_kit.recipes.demo.model import shipped_model_dir
from idefics3_kit.train import ConversationCollator, ConversationDataset, RecordError, Trainer
from idefics3_kit.train.collator import measure_dataset
from idefics3_kit.train.sampling import GlobalOrder
from tests.train.photos import DATA, records, write_jsonl


@pytest.fixture(scope="module")
def processor():
    return ik.Processor.from_pretrained(shipped_model_dir())


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("photos"))


def _texts(dataset):
    return [json.dumps(c.messages) for c in dataset.conversations]


def test_every_source_reads_the_same_conversations(tmp_path, photos):
    datasets = pytest.importorskip("datasets")
    jsonl = ConversationDataset.from_source(str(photos))
    as_json = tmp_path / "train.json"
    as_json.write_text(json.dumps(records()))
    for name in {r["images"][0] for r in records()}:
        (tmp_path / name).write_bytes((DATA / name).read_bytes())
    rows = [{"messages": r["messages"], "images": [str(photos.parent / i) for i in r["images"]]} for r in records()]
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "train.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    for source in (str(as_json), str(tmp_path / "train.parquet"), str(tmp_path / "saved"), table):
        got = ConversationDataset.from_source(source)
        assert _texts(got) == _texts(jsonl), source
        assert len(got[0][1]) == 1 and got[0][1][0].dtype == torch.uint8


def test_inline_images_and_string_content(tmp_path, processor):
    encoded = base64.b64encode((DATA / "rocket.jpg").read_bytes()).decode()
    record = {"messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image", "url": f"data:image/jpeg;base64,{encoded}"},
                                     {"type": "image", "path": str(DATA / "chelsea.png")},
                                     {"type": "text", "text": "What are these?"}]},
        {"role": "assistant", "content": "A rocket and a cat."}]}
    dataset = ConversationDataset.from_source([record])
    conversation, images = dataset[0]
    assert [tuple(i.shape) for i in images] == [(427, 640, 3), (300, 451, 3)]
    assert conversation.messages[0]["content"] == [{"type": "text", "text": "Answer briefly."}]


def test_labels_are_every_assistant_turn_and_nothing_else(photos, processor):
    dataset = ConversationDataset.from_source(str(photos))
    measure_dataset(dataset, processor, None)
    multi = [i for i, c in enumerate(dataset.conversations) if len(c.messages) == 4]
    items = [dataset[i] for i in multi[:2]] + [dataset[0]]
    batch = ConversationCollator(processor)(items)["inputs"]
    eou = "<end_of_utterance>\n"
    for row, (conversation, _) in enumerate(items):
        labels = batch["labels"][row]
        answers = [m["content"][0]["text"] for m in conversation.messages if m["role"] == "assistant"]
        # the labelled tokens, in order, are exactly " answer<end_of_utterance>\n" per assistant turn
        assert processor.decode(labels[labels != -100].tolist()) == "".join(f" {a}{eou}" for a in answers)
        assert (batch["input_ids"][row][labels != -100] == labels[labels != -100]).all()
        assert not (labels == processor.image_token_id).any()
    assert batch["attention_mask"][:, 0].all()  # right padded
    # the measured length is the processed one
    assert [dataset.lengths[i] for i in multi[:2]] + [dataset.lengths[0]] == batch["attention_mask"].sum(1).tolist()


@pytest.mark.parametrize("record,match", [
    ({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
                   {"role": "assistant", "content": "x"}], "images": ["missing.png"]}, "image file not found"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}],
      "images": ["chelsea.png"]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]},
                   {"role": "assistant", "content": "x"}], "images": ["chelsea.png"]},
     "more <image> slots than images"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
      "images": ["chelsea.png"]}, "holds 1 images but the messages have 0 <image> slots"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "'role' must be one of"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "unknown content type 'video'"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": ["a"]}]}]}, "'text' must be a string"),
    ({"images": []}, "'messages' must be a non-empty list"),
])
def test_bad_records_are_named(tmp_path, record, match):
    (tmp_path / "chelsea.png").write_bytes((DATA / "chelsea.png").read_bytes())
    good = records()[0] | {"images": ["chelsea.png"]}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(RecordError, match=rf"data.jsonl record 1: .*{match}"):
        ConversationDataset.from_source(str(path))
    skipping = ConversationDataset.from_source(str(path), skip_bad_records=True)
    assert len(skipping) == 1 and sum(skipping.skipped.values()) == 1


def test_unreadable_image_is_named_or_counted(tmp_path, processor):
    (tmp_path / "broken.png").write_bytes((DATA / "chelsea.png").read_bytes()[:2000])
    (tmp_path / "chelsea.png").write_bytes((DATA / "chelsea.png").read_bytes())
    rows = [records()[0] | {"images": ["chelsea.png"]}, records()[1] | {"images": ["broken.png"]}]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = ConversationDataset.from_source(str(path))
    with pytest.raises(RecordError, match=r"data.jsonl record 1.*broken.png"):
        dataset[1]
    skipping = ConversationDataset.from_source(str(path), skip_bad_records=True)
    out = ConversationCollator(processor)([skipping[0], skipping[1]])
    assert out["examples"] == 1 and out["skipped"] == {"unreadable image": 1}


def test_a_bad_line_and_an_unknown_source(tmp_path, processor):
    path = tmp_path / "data.jsonl"
    path.write_text('{"messages": []}\n{not json\n')
    with pytest.raises(RecordError, match="data.jsonl line 2: not valid JSON"):
        ConversationDataset.from_source(str(path))
    cfg = {"out_dir": str(tmp_path / "run"), "model": {"init": shipped_model_dir()},
           "data": {"source": "my_dataset.jsonl"}, "steps": 1, "batch_size": 1}
    with pytest.raises(ValueError, match="'my_dataset.jsonl' is neither a data file or folder nor a registered"):
        Trainer(config=cfg, progress=False).train_data


def test_max_length_truncates_text_and_never_an_image(tmp_path, processor):
    long_answer = " ".join(["very"] * 60) + " long."
    rows = [records()[0] | {"images": ["chelsea.png"]},
            {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
                          {"role": "assistant", "content": long_answer}], "images": ["chelsea.png"]}]
    path = write_jsonl(tmp_path, rows=rows)
    full = ConversationDataset.from_source(str(path))
    measure_dataset(full, processor, None)
    image_end = 4 + 5 * processor.image_seq_len  # the image block ends well before the long answer does
    limit = max(image_end + 20, full.lengths[0] + 1)
    assert full.lengths[1] > limit
    cut = ConversationDataset.from_source(str(path))
    measure_dataset(cut, processor, limit)
    assert cut.lengths == [full.lengths[0], limit] and not cut.skipped
    batch = ConversationCollator(processor, limit)([cut[0], cut[1]])["inputs"]
    assert batch["input_ids"].shape[1] == limit and (batch["labels"][1] != -100).any()
    tiny = ConversationDataset.from_source(str(path))
    with pytest.raises(ValueError, match="no usable record"):  # every cut would fall inside an image
        measure_dataset(tiny, processor, 10)
    assert tiny.skipped == {"max_length would cut through an image": 2}


def test_length_grouping_pads_less():
    lengths = [10, 200] * 32
    mixed = GlobalOrder(len(lengths), 8, seed=0, lengths=None)
    grouped = GlobalOrder(len(lengths), 8, seed=0, lengths=lengths)

    def padded(order):
        pads = []
        for step in range(order.steps_per_epoch):
            batch = [lengths[i] for i in order.step(step)]
            pads.append(1 - sum(batch) / (len(batch) * max(batch)))
        return sum(pads) / len(pads)

    assert padded(grouped) < 0.05 < 0.3 < padded(mixed)
    # the same examples every epoch, each exactly once
    assert sorted(i for s in range(grouped.steps_per_epoch) for i in grouped.step(s)) == list(range(64))
    # a step's examples do not depend on the world size; the shards cover them exactly
    assert sorted(grouped.shard(3, 0, 2) + grouped.shard(3, 1, 2)) == sorted(grouped.step(3))
