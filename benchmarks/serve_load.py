"""Load test of ``idefics3-kit serve`` on loopback: N concurrent streaming clients, bounded.

Starts the server as a subprocess on 127.0.0.1 (the shipped demo model unless --model), then for
each concurrency (default 1, 8, 32) runs that many clients, each sending streaming chat requests
(an image + a question, ``max_tokens`` new tokens with ``ignore_eos`` so every answer has the same
length) back to back until --seconds have passed or --max-requests were sent. Printed per row:
requests/s, output tokens/s, p50/p99 time to first token, errors, incomplete answers.

Then batched vs one at a time, side by side: a second server with --max-batch-size 1 (requests
decoded one after another) runs alongside the batched one, and --rounds rounds alternate the two
(A B B A ...) at --compare-at concurrent streams, so a fast or slow phase of the machine falls on
both; each round's pair gives a ratio, and the median ratio is the claim. Target: >= 3x output
tokens/s at 8 streams.

By default every request carries the same image, so after the first one the server's vision
feature cache answers its tiles; --distinct-images gives each request its own image (a dot grid
in a colour of its own), so every request runs the vision tower.

    python benchmarks/serve_load.py [--model DIR] [--dtype fp32] [--seconds 8] [--max-tokens 32]
                                    [--threads 1] [--rounds 3] [--distinct-images]

The demo model's decoder is tiny (2.6 M parameters: its steps are overhead, whatever the batch);
benchmarks/make_serve_model.py writes one with SmolVLM-256M's decoder shapes to load-test a decoder
that is bound by reading its weights, as real ones are (``--model DIR --dtype bf16``).

Nothing leaves the machine: the clients talk to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "idefics3_kit", "recipes", "demo", "assets", "example.png")
DEMO = os.path.join(ROOT, "idefics3_kit", "recipes", "demo", "assets", "demo_model")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, max_batch: int, threads: int, queue: int, dtype: str = "fp32"):
    port = free_port()
    cmd = [sys.executable, "-m", "idefics3_kit.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "bench", "--max-batch-size", str(max_batch), "--max-queue", str(queue),
           "--threads", str(threads), "--dtype", dtype, "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": ROOT}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not become healthy in 120 s")


def request_body(max_tokens: int, image: bytes | None = None) -> dict:
    if image is None:
        with open(EXAMPLE, "rb") as f:
            image = f.read()
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return {"model": "bench", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "What color is the circle?"}]}]}


def distinct_image(index: int, base) -> bytes:
    """The example image with a 16-px dot grid in a colour of its own (``index``): every processor
    tile differs from every other index's, so the server's feature cache never hits. ~0.3 ms."""
    img = base.copy()
    colour = (index % 256, (index // 256) % 256, (index // 65536) % 256)
    for y in range(0, img.height, 16):
        for x in range(0, img.width, 16):
            img.putpixel((x, y), colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class Bodies:
    """The request bodies the clients send: one shared body, or a new image in every request."""

    def __init__(self, max_tokens: int, distinct: bool = False):
        self.max_tokens = max_tokens
        self.shared = request_body(max_tokens)
        self.base = None
        if distinct:
            from PIL import Image

            self.base = Image.open(EXAMPLE).convert("RGB")
        self.count = 0

    def take(self) -> dict:
        if self.base is None:
            return self.shared
        self.count += 1
        return request_body(self.max_tokens, distinct_image(self.count, self.base))


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    """Stream one answer: time to first content, tokens (from usage), complete or not."""
    start = time.perf_counter()
    ttft, tokens, finished, done = None, 0, False, False
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"error": f"HTTP {r.status_code}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content") and ttft is None:
                        ttft = time.perf_counter() - start
                    finished = finished or choice.get("finish_reason") is not None
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        return {"error": type(exc).__name__}
    complete = done and finished and tokens == body["max_tokens"]
    return {"ttft": ttft if ttft is not None else time.perf_counter() - start, "tokens": tokens,
            "complete": complete, "seconds": time.perf_counter() - start}


async def load(url: str, concurrency: int, seconds: float, max_requests: int, bodies: Bodies) -> dict:
    results: list = []
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)

    async def worker(client):
        while time.perf_counter() < stop_at and len(results) < max_requests:
            results.append(await one_request(client, url, bodies.take()))

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await one_request(client, url, bodies.take())  # warm-up (not counted)
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    ttfts = sorted(r["ttft"] for r in ok)
    return {"concurrency": concurrency, "requests": len(results), "wall": wall,
            "rps": len(ok) / wall, "tok_s": sum(r["tokens"] for r in ok) / wall,
            "p50": _pct(ttfts, 50), "p99": _pct(ttfts, 99), "errors": len(results) - len(ok),
            "incomplete": sum(not r["complete"] for r in ok)}


def _pct(values: list, p: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[min(int(p), 99) - 1] if p < 100 else values[-1]


def row(name: str, r: dict) -> str:
    return (f"{name:<22s} {r['concurrency']:>4d} {r['requests']:>6d} {r['rps']:>8.2f} {r['tok_s']:>9.1f} "
            f"{r['p50'] * 1000:>9.1f} {r['p99'] * 1000:>9.1f} {r['errors']:>6d} {r['incomplete']:>10d}")


HEADER = (f"{'server':<22s} {'conc':>4s} {'reqs':>6s} {'req/s':>8s} {'out tok/s':>9s} {'ttft p50':>9s} "
          f"{'ttft p99':>9s} {'errors':>6s} {'incomplete':>10s}\n" + "-" * 92)


def compare_rounds(urls: dict, args, bodies: Bodies) -> list[dict]:
    """Rounds at --compare-at streams, the two servers alternating A B B A ...: per round
    {"one": result, "batched": result}."""
    rounds = []
    for r in range(args.rounds):
        order = ("one", "batched") if r % 2 == 0 else ("batched", "one")
        got = {name: asyncio.run(load(urls[name], args.compare_at, args.seconds, args.max_requests, bodies))
               for name in order}
        rounds.append(got)
    return rounds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEMO, help="checkpoint to serve (default: the shipped demo model)")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated stream counts (default: 1,8,32)")
    ap.add_argument("--seconds", type=float, default=8.0, help="load time per row (default: 8)")
    ap.add_argument("--max-requests", type=int, default=2000, help="most requests per row (default: 2000)")
    ap.add_argument("--max-tokens", type=int, default=32, help="new tokens per answer (default: 32)")
    ap.add_argument("--max-batch-size", type=int, default=32, help="the batched server's batch (default: 32)")
    ap.add_argument("--compare-at", type=int, default=8, help="streams for batched vs sequential (default: 8)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the comparison (default: 3)")
    ap.add_argument("--threads", type=int, default=1, help="the servers' torch threads (default: 1)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="the servers' --dtype")
    ap.add_argument("--distinct-images", action="store_true",
                    help="a different image in every request (the feature cache never hits)")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    bodies = Bodies(args.max_tokens, distinct=args.distinct_images)
    queue = max(levels + [args.compare_at]) + 8
    batched_name = f"batched (max {args.max_batch_size})"
    procs, urls = [], {}
    try:
        for name, batch in (("one", 1), ("batched", args.max_batch_size)):
            proc, urls[name] = start_server(args.model, batch, args.threads, queue, args.dtype)
            procs.append(proc)
        levels_done = [asyncio.run(load(urls["batched"], c, args.seconds, args.max_requests, bodies)) for c in levels]
        rounds = compare_rounds(urls, args, bodies)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
    print(f"model {os.path.relpath(args.model, ROOT)}; {args.max_tokens} new tokens per answer (ignore_eos), "
          f"image + question ({'a different image in every request' if args.distinct_images else 'the same image'}), "
          f"{args.seconds:g} s per row, server threads {args.threads}, {args.dtype}")
    print(HEADER)
    for r in levels_done:
        print(row(batched_name, r))
    print(f"\nbatched vs one at a time at {args.compare_at} streams, {args.rounds} alternating rounds:")
    print(HEADER)
    ratios = []
    for i, got in enumerate(rounds):
        print(row(f"round {i + 1}: one at a time", got["one"]))
        print(row(f"round {i + 1}: batched", got["batched"]))
        ratios.append(got["batched"]["tok_s"] / got["one"]["tok_s"] if got["one"]["tok_s"] else float("nan"))
    print("\nratio (batched / one at a time, output tokens/s) by round: "
          + ", ".join(f"{x:.2f}x" for x in ratios)
          + f"; median {statistics.median(ratios):.2f}x (target >= 3x)")
    every = levels_done + [r for got in rounds for r in got.values()]
    bad = sum(r["errors"] + r["incomplete"] for r in every)
    print("every response complete, 0 errors" if bad == 0 else f"PROBLEMS: {bad} failed or incomplete responses")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
