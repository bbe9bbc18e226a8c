"""Request parsing, limits, images, stop strings, batching helpers and metrics, without a server."""

from __future__ import annotations

import base64
import http.server
import os
import struct
import threading
import zlib

import pytest
import torch

from idefics3_kit.serve.engine import _first_stop, _held_back, collate
from idefics3_kit.serve.errors import APIError
from idefics3_kit.serve.images import load_image
from idefics3_kit.serve.metrics import Metrics
from idefics3_kit.serve.requests import PreparedInputs, parse_chat_request, prepare_inputs
from idefics3_kit.serve.settings import ServeSettings

from .conftest import data_url, example_png, png_bytes

S = ServeSettings(model_name="demo", max_images_per_request=2, max_image_pixels=200 * 200, max_tokens_cap=64)


def body(**kw):
    return {"model": "demo", "messages": [{"role": "user", "content": "hi"}], **kw}


def refused(b, settings=S, status=400):
    with pytest.raises(APIError) as info:
        parse_chat_request(b, settings)
    assert info.value.status == status
    return info.value


def test_a_plain_request_parses_into_template_messages():
    r = parse_chat_request(body(messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(example_png())}},
                                     {"type": "text", "text": "colour?"}]},
        {"role": "assistant", "content": "red"}], max_tokens=5, temperature=0.5, top_p=0.9, seed=3, stop="x", n=2),
        S)
    assert r.messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": "colour?"}]
    assert r.messages[0] == {"role": "system", "content": [{"type": "text", "text": "be brief"}]}
    assert len(r.images) == 1 and r.images[0].shape == (128, 160, 3) and r.images[0].dtype == torch.uint8
    p = r.params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop, p.n) == (5, 0.5, 0.9, 3, ("x",), 2)


def test_max_completion_tokens_wins_over_max_tokens():
    assert parse_chat_request(body(max_tokens=5, max_completion_tokens=7), S).params.max_tokens == 7


@pytest.mark.parametrize("fields,param,words", [
    ({"max_tokens": 0}, "max_tokens", "integer >= 1"),
    ({"max_tokens": 65}, "max_tokens", "limit of 64"),
    ({"max_completion_tokens": 1.5}, "max_completion_tokens", "integer"),
    ({"temperature": 2.5}, "temperature", "[0.0, 2.0]"),
    ({"temperature": "hot"}, "temperature", "number"),
    ({"top_p": 0}, "top_p", "top_p"),
    ({"n": 0}, "n", "'n'"),
    ({"n": 9}, "n", "'n'"),
    ({"seed": "x"}, "seed", "integer"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
    ({"stop": [""]}, "stop", "non-empty"),
    ({"stream": "yes"}, "stream", "true or false"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed"),
    ({"tools": [{"type": "function"}]}, "tools", "not supported"),
    ({"logprobs": True}, "logprobs", "not supported"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
    ({"response_format": {"type": "json_object"}}, "response_format", "not supported"),
    ({"bogus": 1}, "bogus", "unrecognized"),
])
def test_bad_fields_are_400_naming_the_field(fields, param, words):
    err = refused(body(**fields))
    assert err.param == param and words in err.message
    assert err.body()["error"]["type"] == "invalid_request_error"


def test_neutral_values_of_unsupported_fields_pass():
    parse_chat_request(body(frequency_penalty=0, presence_penalty=0.0, logprobs=False, tools=[], user="u"), S)


@pytest.mark.parametrize("messages,words", [
    ([], "non-empty list"),
    ("hi", "non-empty list"),
    ([{"role": "tool", "content": "x"}], "role 'tool'"),
    ([{"role": "user"}], "content must be"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "unsupported content part type 'audio'"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "text must be a string"),
    ([{"role": "user", "content": "x", "tool_calls": []}], "tool_calls"),
    ([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}], "only allowed in user"),
])
def test_bad_messages_are_400(messages, words):
    assert words in refused(body(messages=messages)).message


def test_model_is_required_and_must_be_the_served_one():
    assert refused({"messages": [{"role": "user", "content": "x"}]}).param == "model"
    err = refused(body(model="gpt-4o"), status=404)
    assert err.code == "model_not_found" and "'demo'" in err.message


def _image_body(url, count=1):
    parts = [{"type": "image_url", "image_url": {"url": url}} for _ in range(count)]
    return body(messages=[{"role": "user", "content": parts + [{"type": "text", "text": "?"}]}])


def test_too_many_images_are_refused():
    err = refused(_image_body(data_url(png_bytes(10, 10)), count=3))
    assert err.code == "too_many_images" and "more than 2 images" in err.message


def test_an_image_over_the_pixel_limit_is_refused():
    assert "over the limit of 40000" in refused(_image_body(data_url(png_bytes(201, 200)))).message


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and which holds (almost) no data: a decompression bomb's shape."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_refused_from_its_header():
    err = refused(_image_body(data_url(_png_header_only(100_000, 100_000))))
    assert "10000000000 pixels" in err.message and err.code == "invalid_image"


@pytest.mark.parametrize("url,words", [
    ("data:image/png;base64,!!!", "not valid base64"),
    ("data:image/png,abc", "base64-encoded"),
    ("data:text/plain;base64,aGk=", "not an image"),
    ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "cannot decode image"),
    ("https://example.com/cat.png", "remote image URLs are not allowed"),
    ("/etc/hostname", "local image files are not allowed"),
    ("ftp://host/x.png", "unsupported image URL scheme"),
    ("", "non-empty string"),
])
def test_bad_image_urls_are_400(url, words):
    assert words in refused(_image_body(url)).message


def test_local_files_only_under_the_allowed_folder(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "ok.png").write_bytes(png_bytes(20, 10))
    (tmp_path / "secret.png").write_bytes(png_bytes(20, 10))
    os.symlink(tmp_path / "secret.png", allowed / "link.png")
    s = S.replace(allowed_image_dir=str(allowed))
    assert load_image("ok.png", s, "img").shape == (10, 20, 3)
    assert load_image(f"file://{allowed}/ok.png", s, "img").shape == (10, 20, 3)
    assert load_image(str(allowed / "ok.png"), s, "img").shape == (10, 20, 3)
    for escape in ("../secret.png", str(tmp_path / "secret.png"), "link.png", f"file://{tmp_path}/secret.png"):
        with pytest.raises(APIError, match="outside the allowed image folder"):
            load_image(escape, s, "img")
    with pytest.raises(APIError, match="not found"):
        load_image("missing.png", s, "img")


@pytest.fixture
def http_images():
    """A loopback HTTP server: /small.png (20x10) and /big.bin (3 MB)."""
    payloads = {"/small.png": png_bytes(20, 10), "/big.bin": b"\0" * (3 * 1024 * 1024)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data = payloads.get(self.path)
            self.send_response(200 if data is not None else 404)
            self.end_headers()
            if data is not None:
                self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_remote_images_when_allowed_with_a_size_limit(http_images):
    s = S.replace(allow_remote_images=True, remote_image_max_bytes=1024 * 1024)
    assert load_image(http_images + "/small.png", s, "img").shape == (10, 20, 3)
    with pytest.raises(APIError, match="larger than 1048576 bytes"):
        load_image(http_images + "/big.bin", s, "img")
    with pytest.raises(APIError, match="cannot fetch"):
        load_image(http_images + "/missing.png", s, "img")


def test_prompt_longer_than_the_context_is_400(demo):
    model, proc = demo
    long = parse_chat_request(body(messages=[{"role": "user", "content": "red circle blue square " * 400}]), S)
    with pytest.raises(APIError) as info:
        prepare_inputs(long, proc, model.config.decoder.max_position_embeddings)
    assert info.value.code == "context_length_exceeded" and "1024 tokens" in info.value.message
    short = parse_chat_request(body(max_tokens=60), S)
    assert prepare_inputs(short, proc, 1024).prompt_tokens < 40
    with pytest.raises(APIError, match="lower max_tokens"):
        prepare_inputs(short, proc, 50)


def test_stop_string_search_and_hold_back():
    assert _first_stop("hello world", ("wor",), 0) == 6
    assert _first_stop("hello", ("x",), 0) is None
    assert _held_back("hello wo", ("world",)) == 2
    assert _held_back("hello", ("world",)) == 0


def test_collate_left_pads_prompts_and_tiles():
    a = PreparedInputs(torch.tensor([[7, 8, 9]]), torch.ones(1, 3, dtype=torch.long),
                       torch.ones(1, 2, 3, 4, 4), torch.ones(1, 2, 4, 4, dtype=torch.bool))
    b = PreparedInputs(torch.tensor([[5]]), torch.ones(1, 1, dtype=torch.long))
    out = collate([a, b], pad_id=0)
    assert out["input_ids"].tolist() == [[7, 8, 9], [0, 0, 5]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert out["pixel_values"].shape == (2, 2, 3, 4, 4) and out["pixel_values"][1].abs().sum() == 0
    assert out["pixel_attention_mask"][1].sum() == 0


def test_metrics_text_exposition():
    m = Metrics()
    m.requests.inc(route="/v1/chat/completions", code="200")
    m.ttft.observe(0.03)
    m.ttft.observe(7.0)
    text = m.render()
    assert 'idefics3_requests_total{code="200",route="/v1/chat/completions"} 1' in text
    assert 'idefics3_time_to_first_token_seconds_bucket{le="0.05"} 1' in text
    assert 'idefics3_time_to_first_token_seconds_bucket{le="+Inf"} 2' in text
    assert "idefics3_time_to_first_token_seconds_count 2" in text
    assert "# TYPE idefics3_time_per_output_token_seconds histogram" in text
    assert "idefics3_queue_depth 0" in text


def test_settings_refuse_bad_limits():
    with pytest.raises(ValueError, match="max_batch_size"):
        ServeSettings(max_batch_size=0)
    with pytest.raises(ValueError, match="api_key"):
        ServeSettings(api_key="")
