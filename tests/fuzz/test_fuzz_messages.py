"""Chat messages and training records: any JSON-like structure renders to a prompt / parses to a
conversation, or raises an error naming the message (or record) and the field."""

from __future__ import annotations

from hypothesis import strategies as st

from idefics3_kit.processing import chat
from idefics3_kit.train.data import parse_record
from tests.fuzz.outcomes import fuzz, outcome

scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | st.text(max_size=6)
roles = st.sampled_from(["user", "assistant", "system", "tool", "", "User", "bot"]) | scalars
items = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["text", "image", "image_url", "video", ""]) | scalars,
    "text": st.text(max_size=10) | scalars | st.lists(st.text(max_size=3), max_size=2),
    "image": st.sampled_from(["a.png", None, 3]),
    "image_url": st.fixed_dictionaries({"url": st.text(max_size=8)}) | scalars})
contents = st.text(max_size=12) | st.lists(items | scalars, max_size=3) | scalars | st.dictionaries(
    st.text(max_size=3), scalars, max_size=2)
messages = st.fixed_dictionaries({}, optional={"role": roles, "content": contents})
conversations = st.lists(messages | scalars, max_size=4) | scalars


def check_render(conversation):
    kind, value = outcome(lambda: chat.render(chat.DEFAULT_CHAT_TEMPLATE, conversation, add_generation_prompt=True,
                                              bos_token="<s>"), names=("message", "conversation", "chat template"))
    if kind == "ok":
        assert isinstance(value, str) and value.startswith("<s>") and value.endswith("Assistant:")


test_chat_messages, test_chat_messages_full = fuzz(conversations)(check_render)


records = st.fixed_dictionaries({}, optional={"messages": conversations, "images": st.lists(
    st.sampled_from(["a.png", "", 3, None]), max_size=3) | scalars}) | scalars


def check_record(record):
    kind, value = outcome(lambda: parse_record(record, "data.jsonl line 7", base_dir="/nonexistent"),
                          names=("data.jsonl line 7",))
    if kind == "ok":
        assert any(m["role"] == "assistant" for m in value.messages)


test_training_records, test_training_records_full = fuzz(records)(check_record)
