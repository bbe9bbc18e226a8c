"""Load test of ``idefics3-kit serve`` on loopback: N concurrent streaming clients, bounded.

Starts the server as a subprocess on 127.0.0.1 (the shipped demo model unless --model), then for
each concurrency (default 1, 8, 32) runs that many clients, each sending streaming chat requests
(an image + a question, ``max_tokens`` new tokens with ``ignore_eos`` so every answer has the same
length) back to back until --seconds have passed or --max-requests were sent. Printed per row:
requests/s, output tokens/s, p50/p99 time to first token, errors, incomplete answers.

Then batched vs one at a time, side by side in the same run: the same load at --compare-at
concurrent streams against a server with --max-batch-size 1 (requests decoded one after another)
and against the batched server. Target: >= 3x output tokens/s at 8 streams.

    python benchmarks/serve_load.py [--model DIR] [--seconds 8] [--max-tokens 32] [--threads 1]

Nothing leaves the machine: the clients talk to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
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


def start_server(model: str, max_batch: int, threads: int, queue: int):
    port = free_port()
    cmd = [sys.executable, "-m", "idefics3_kit.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "bench", "--max-batch-size", str(max_batch), "--max-queue", str(queue),
           "--threads", str(threads), "--log-level", "warning"]
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


def request_body(max_tokens: int) -> dict:
    with open(EXAMPLE, "rb") as f:
        image = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    return {"model": "bench", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                      {"type": "text", "text": "What color is the circle?"}]}]}


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


async def load(url: str, concurrency: int, seconds: float, max_requests: int, body: dict) -> dict:
    results: list = []
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)

    async def worker(client):
        while time.perf_counter() < stop_at and len(results) < max_requests:
            results.append(await one_request(client, url, body))

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await one_request(client, url, body)  # warm-up (not counted)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEMO, help="checkpoint to serve (default: the shipped demo model)")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated stream counts (default: 1,8,32)")
    ap.add_argument("--seconds", type=float, default=8.0, help="load time per row (default: 8)")
    ap.add_argument("--max-requests", type=int, default=2000, help="most requests per row (default: 2000)")
    ap.add_argument("--max-tokens", type=int, default=32, help="new tokens per answer (default: 32)")
    ap.add_argument("--max-batch-size", type=int, default=32, help="the batched server's batch (default: 32)")
    ap.add_argument("--compare-at", type=int, default=8, help="streams for batched vs sequential (default: 8)")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads (default: 1)")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    body = request_body(args.max_tokens)
    queue = max(levels + [args.compare_at]) + 8
    results = {}
    for name, batch in (("one at a time (batch 1)", 1), (f"batched (max {args.max_batch_size})", args.max_batch_size)):
        proc, url = start_server(args.model, batch, args.threads, queue)
        try:
            todo = [args.compare_at] if batch == 1 else levels
            results[name] = [asyncio.run(load(url, c, args.seconds, args.max_requests, body)) for c in todo]
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"model {os.path.relpath(args.model, ROOT)}; {args.max_tokens} new tokens per answer (ignore_eos), "
          f"image + question, {args.seconds:g} s per row, server threads {args.threads}")
    print(HEADER)
    for name, rows in results.items():
        for r in rows:
            print(row(name, r))
    sequential = results["one at a time (batch 1)"][0]
    batched = next((r for r in list(results.values())[1] if r["concurrency"] == args.compare_at), None)
    if batched is not None:
        ratio = batched["tok_s"] / sequential["tok_s"] if sequential["tok_s"] else float("nan")
        print(f"\nat {args.compare_at} concurrent streams: batched {batched['tok_s']:.1f} vs one at a time "
              f"{sequential['tok_s']:.1f} output tokens/s = {ratio:.2f}x (target >= 3x)")
    bad = sum(r["errors"] + r["incomplete"] for rows in results.values() for r in rows)
    print("every response complete, 0 errors" if bad == 0 else f"PROBLEMS: {bad} failed or incomplete responses")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
