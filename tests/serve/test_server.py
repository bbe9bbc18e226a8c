"""The live server through the official ``openai`` client (and httpx for what the client hides)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json

import httpx
import pytest
import torch

from .conftest import EngineGate, client, data_url, example_png, image_message, live_server, png_bytes

openai = pytest.importorskip("openai")

QUESTIONS = ["What color is the circle?", "What shape is in the top left?", "What color is the square?",
             "Where is the circle?"]


def generate_text(demo, question: str, max_new_tokens: int = 8, ignore_eos: bool = False) -> str:
    """What model.generate answers for the same prompt (greedy): the reference for the server."""
    from idefics3_kit.processing.images import to_rgb

    model, proc = demo
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    batch = proc(text=[prompt], images=[[to_rgb(example_png())]], return_tensors="pt")
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values",
                                                      "pixel_attention_mask")}
    with torch.inference_mode():
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             **({"eos_token_id": []} if ignore_eos else {}))
    return proc.decode(ids[0, batch["input_ids"].shape[1]:].tolist(), skip_special_tokens=True)


def test_chat_completion_with_an_image_answers_like_generate(server, demo):
    url, _ = server
    r = client(url).chat.completions.create(model="demo", messages=image_message(), max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.model == "demo" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == generate_text(demo, "What color is the circle?")
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 9 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_yields_the_same_text(server, demo):
    url, _ = server
    stream = client(url).chat.completions.create(model="demo", messages=image_message(), max_tokens=8,
                                                 temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == generate_text(demo, "What color is the circle?")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1


def test_raw_stream_is_server_sent_events_ending_with_done(server):
    url, _ = server
    body = {"model": "demo", "messages": image_message(), "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    json.loads(lines[0][6:])


def test_length_limit_and_finish_reason(server):
    url, _ = server
    r = client(url).chat.completions.create(model="demo", messages=[{"role": "user", "content": "Describe"}],
                                            max_completion_tokens=1, temperature=0)
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason in ("length", "stop")


def test_stop_strings_cut_the_answer(server, demo):
    url, _ = server
    full = generate_text(demo, "What color is the circle?")
    assert len(full.strip()) >= 2
    stop = full.strip()[1]
    r = client(url).chat.completions.create(model="demo", messages=image_message(), max_tokens=8, temperature=0,
                                            stop=[stop])
    assert r.choices[0].message.content == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    s = client(url).chat.completions.create(model="demo", messages=image_message(), max_tokens=8, temperature=0,
                                            stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == full[:full.index(stop)]


def test_seed_makes_sampling_reproducible_and_n_gives_choices(server):
    url, _ = server
    c = client(url)
    kw = dict(model="demo", messages=[{"role": "user", "content": "Tell me about shapes"}], max_tokens=12,
              temperature=1.5, top_p=0.95)
    a = c.chat.completions.create(seed=11, **kw).choices[0].message.content
    b = c.chat.completions.create(seed=11, **kw).choices[0].message.content
    assert a == b
    many = c.chat.completions.create(seed=11, n=3, **kw)
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    assert many.choices[0].message.content == a  # choice i uses seed + i: choice 0 is the n=1 answer
    assert many.usage.completion_tokens >= 3


def test_concurrent_requests_are_batched_and_each_answer_is_its_own(server, demo):
    url, app = server
    expected = {q: generate_text(demo, q) for q in QUESTIONS}
    c = client(url)
    gate = EngineGate(app)
    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            first = pool.submit(c.chat.completions.create, model="demo", messages=image_message(QUESTIONS[0]),
                                max_tokens=8, temperature=0)
            assert gate.entered.wait(30)  # the worker holds the first request; the next ones queue up
            rest = [pool.submit(c.chat.completions.create, model="demo", messages=image_message(q), max_tokens=8,
                                temperature=0) for q in QUESTIONS * 2]
            _wait_for_queue(app, len(rest))
            gate.release()
            answers = [f.result().choices[0].message.content for f in [first] + rest]
    finally:
        gate.restore()
    assert answers == [expected[q] for q in [QUESTIONS[0]] + QUESTIONS * 2]
    assert gate.batches == [1, len(rest)]  # all the waiting requests decoded as one batch


def _wait_for_queue(app, count, timeout=30.0):
    import time

    deadline = time.monotonic() + timeout
    while app.state.engine.queue.qsize() < count:
        assert time.monotonic() < deadline, "requests did not reach the queue"
        time.sleep(0.01)


def test_models_health_and_metrics(server):
    url, _ = server
    client(url).chat.completions.create(model="demo", messages=image_message(), max_tokens=2, temperature=0,
                                        extra_body={"ignore_eos": True})  # the series this test reads exist
    models = client(url).models.list()
    assert [m.id for m in models.data] == ["demo"]
    assert httpx.get(url + "/v1/models/demo").json()["id"] == "demo"
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    text = httpx.get(url + "/metrics").text
    for series in ("idefics3_requests_total", "idefics3_completion_tokens_total", "idefics3_queue_depth",
                   "idefics3_time_to_first_token_seconds_bucket", "idefics3_time_per_output_token_seconds_bucket"):
        assert series in text
    assert 'route="/v1/chat/completions"' in text


def _post(url, body=None, **kw):
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60, **kw)


def _error(r, status):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server):
    url, app = server
    ok = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert "max_tokens" in _error(_post(url, {**ok, "max_tokens": 10_000}), 400)["message"]
    assert _error(_post(url, {**ok, "model": "other"}), 404)["code"] == "model_not_found"
    assert "temperature" in _error(_post(url, {**ok, "temperature": -1}), 400)["message"]
    assert "not valid JSON" in _error(httpx.post(url + "/v1/chat/completions", content=b"{nope"), 400)["message"]
    assert "JSON object" in _error(_post(url, [1, 2]), 400)["message"]
    three = [{"type": "image_url", "image_url": {"url": data_url(png_bytes(8, 8))}}] * 3
    assert "more than 2 images" in _error(_post(url, {**ok, "messages": [{"role": "user", "content": three}]}),
                                          400)["message"]
    big = [{"type": "image_url", "image_url": {"url": data_url(png_bytes(300, 300))}}]
    assert "over the limit" in _error(_post(url, {**ok, "messages": [{"role": "user", "content": big}]}),
                                      400)["message"]
    remote = [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}]
    assert "remote image URLs are not allowed" in _error(
        _post(url, {**ok, "messages": [{"role": "user", "content": remote}]}), 400)["message"]
    escape = [{"type": "image_url", "image_url": {"url": "../../etc/passwd"}}]
    assert "outside the allowed" in _error(_post(url, {**ok, "messages": [{"role": "user", "content": escape}]}),
                                           400)["message"]
    long = [{"role": "user", "content": "red circle blue square " * 400}]
    assert _error(_post(url, {**ok, "messages": long}), 400)["code"] == "context_length_exceeded"
    assert _error(httpx.get(url + "/v1/nothing"), 404)["type"] == "not_found_error"
    _error(httpx.get(url + "/v1/chat/completions"), 405)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(url).chat.completions.create(model="demo", messages=ok["messages"], max_tokens=10_000)
    r = _post(url, ok)  # still serving
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_a_local_image_from_the_allowed_folder(server, demo):
    url, app = server
    (app.state.image_dir / "example.png").write_bytes(example_png())
    r = client(url).chat.completions.create(model="demo", messages=image_message(url="example.png"), max_tokens=8,
                                            temperature=0)
    assert r.choices[0].message.content == generate_text(demo, "What color is the circle?")


def test_body_size_is_limited_by_header_and_by_bytes(server):
    url, _ = server
    payload = b'{"model": "demo", "pad": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    assert _error(httpx.post(url + "/v1/chat/completions", content=payload), 413)["code"] == "request_too_large"

    def chunks():  # no Content-Length: the bytes are counted as they arrive
        for _ in range(48):
            yield b"x" * 65536
    assert _error(httpx.post(url + "/v1/chat/completions", content=chunks()), 413)["code"] == "request_too_large"


def test_api_key(demo):
    with live_server(*demo, api_key="s3cret") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        r = httpx.get(url + "/v1/models")
        assert _error(r, 401)["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert client(url, api_key="s3cret").models.list().data[0].id == "demo"
        r = client(url, api_key="s3cret").chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert r.choices[0].message.role == "assistant"
        assert httpx.get(url + "/health").status_code == 200  # probes need no key


def test_a_full_queue_is_429_with_retry_after(demo):
    with live_server(*demo, max_queue=1, max_batch_size=1, batch_window_ms=0) as (url, app):
        gate = EngineGate(app)
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        try:
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                running = pool.submit(_post, url, body)
                assert gate.entered.wait(30)
                waiting = pool.submit(_post, url, body)
                _wait_for_queue(app, 1)
                r = _post(url, body)
                assert _error(r, 429)["code"] == "queue_full" and r.headers["retry-after"] == "1"
                gate.release()
                assert running.result().status_code == 200 and waiting.result().status_code == 200
        finally:
            gate.restore()


def test_timeout_is_504_and_cancels_the_work(demo):
    with live_server(*demo, request_timeout_s=0.5) as (url, app):
        gate = EngineGate(app)
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        try:
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                blocker = pool.submit(_post, url, body)
                assert gate.entered.wait(30)
                assert _error(_post(url, body), 504)["code"] == "timeout"
                gate.release()
                blocker.result()
        finally:
            gate.restore()
        assert _cancelled(url) >= 1


@contextlib.contextmanager
def _wrapped_step(engine, before):
    """Run ``before(running)`` ahead of each of the engine's decode steps (slow them, fail one)."""
    step = engine._step

    def wrapped(running):
        before(running)
        step(running)

    engine._step = wrapped
    try:
        yield
    finally:
        engine._step = step


def _cancelled(url) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("idefics3_cancelled_requests_total "):
            return float(line.split()[1])
    return 0.0


def test_a_client_that_disconnects_cancels_its_work(demo):
    import time

    with live_server(*demo) as (url, app):
        gate = EngineGate(app)
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        try:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                blocker = pool.submit(_post, url, body)
                assert gate.entered.wait(30)
                with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}) as r:
                    next(r.iter_lines())  # the role chunk: the request is queued
                # closed: the stream's generator is closed, which cancels the queued job
                time.sleep(0.3)
                gate.release()
                assert blocker.result().status_code == 200
        finally:
            gate.restore()
        deadline = time.monotonic() + 10
        while _cancelled(url) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _cancelled(url) == 1
        assert len(gate.batches) == 1  # the cancelled request never reached the model


def test_ignore_eos_generates_max_tokens(server):
    url, _ = server
    r = client(url).chat.completions.create(model="demo", messages=image_message(), max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"


def test_a_request_joins_a_batch_that_is_decoding_and_finishes_first(server, demo):
    """Continuous batching: B arrives while A decodes a long answer, joins A's batch at the next step
    (no waiting for A to end) and is answered while A goes on; both answer as generate does alone."""
    import time

    url, app = server
    c = client(url)
    long_tokens = 64  # the fixture's cap; each step slowed to >= 5 ms so A lasts >= 0.3 s
    with _wrapped_step(app.state.engine, lambda running: time.sleep(0.005)):
        _join_while_decoding(c, demo, long_tokens)


def _join_while_decoding(c, demo, long_tokens):
    import threading
    import time

    stream = c.chat.completions.create(model="demo", messages=image_message(QUESTIONS[0]), max_tokens=long_tokens,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(ch for ch in chunks if ch.choices and ch.choices[0].delta.content)
    pieces, a_done = [first.choices[0].delta.content], {}

    def read_rest():
        for ch in chunks:
            if ch.choices and ch.choices[0].delta.content:
                pieces.append(ch.choices[0].delta.content)
        a_done["at"] = time.monotonic()

    reader = threading.Thread(target=read_rest)
    reader.start()
    b = c.chat.completions.create(model="demo", messages=image_message(QUESTIONS[1]), max_tokens=8, temperature=0)
    b_done = time.monotonic()
    reader.join(60)
    assert b_done < a_done["at"]  # B did not wait for the end of A
    assert b.choices[0].message.content == generate_text(demo, QUESTIONS[1])
    expected_a = generate_text(demo, QUESTIONS[0], max_new_tokens=long_tokens, ignore_eos=True)
    assert "".join(pieces) == expected_a


def test_a_failing_decode_step_fails_its_requests_and_the_server_goes_on(server, demo):
    url, app = server
    calls = []

    def fail_once(running):
        if not calls:
            calls.append(1)
            raise RuntimeError("boom")

    with _wrapped_step(app.state.engine, fail_once):
        with pytest.raises(openai.InternalServerError, match="generation failed: RuntimeError: boom"):
            client(url).chat.completions.create(model="demo", messages=image_message(), max_tokens=4, temperature=0)
    answer = client(url).chat.completions.create(model="demo", messages=image_message(QUESTIONS[2]), max_tokens=8,
                                                 temperature=0)
    assert answer.choices[0].message.content == generate_text(demo, QUESTIONS[2])


def test_a_client_that_disconnects_mid_answer_leaves_the_batch(demo):
    """Cancel during decoding: the row leaves the running batch at the next step (continuous
    batching), long before its 64 tokens, and the server goes on serving."""
    import time

    with live_server(*demo) as (url, app):
        engine, steps = app.state.engine, []

        def slow_step(running):
            steps.append(len(running))
            time.sleep(0.01)

        with _wrapped_step(engine, slow_step):
            body = {"model": "demo", "messages": image_message(), "max_tokens": 64, "temperature": 0, "stream": True,
                    "ignore_eos": True}
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
                lines = r.iter_lines()
                while "content" not in next(lines):  # the first token has streamed: it is decoding
                    pass
            deadline = time.monotonic() + 10
            while _cancelled(url) < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _cancelled(url) == 1
            assert len(steps) < 60  # it stopped decoding well before its budget
            assert engine.metrics.running.values.get((), 0) == 0
        answer = client(url).chat.completions.create(model="demo", messages=image_message(QUESTIONS[3]), max_tokens=8,
                                                     temperature=0)
        assert answer.choices[0].message.content == generate_text(demo, QUESTIONS[3])
