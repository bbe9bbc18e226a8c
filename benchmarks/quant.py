"""Decode speed of weight-only quantized models: int8 / int4 vs our bf16, side by side in one run.

    python benchmarks/quant.py [--threads 2] [--context 128] [--tokens 64] [--batches 1 4]
                               [--group-size 64] [--rounds 3] [--busy] [--llama GGUF_DIR]

SmolVLM-256M decoder shapes with random weights (VLMConfig.preset("smolvlm-256m")), LM head
quantized too. For each variant and batch: time to first token (a prefill of --context tokens)
and decode tokens/s (single-token steps, greedy ids fed back, each step timed), best of --rounds
interleaved rounds, in two windows: the first FIRST_STEPS steps right after the prefill, and the
steps after them up to --tokens ("steady"). They differ: on this machine the first steps after a
prefill (or any pause) run up to 1.4x slower than the steady ones for int4, less for int8, not at
all for bf16 (docs/quantization.md, "Right after a prefill"), so a 16-token window and a long
answer give different ratios; both are printed. Also printed: the weight bytes each decode step reads (decoder linears + LM head + norms;
the embedding reads one row) and the achieved GB/s next to a measured read bandwidth.
--busy repeats everything with one background process spinning (`nice -n 10 python3 -c
"while True: pass"`) and prints busy / quiet ratios (issue 21, item 6).
--llama DIR: the optional llama.cpp leg, in the same interleaved rounds (batch 1): bf16.gguf,
q8_0.gguf and q4_0.gguf of the same decoder (benchmarks/make_gguf.py writes them with llama.cpp's own converter
and quantizer) through llama-cpp-python; without them it is skipped with a note.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import idefics3_kit as ik  # noqa: E402
from idefics3_kit import ops  # noqa: E402
from idefics3_kit.ops import quant  # noqa: E402


def step_bytes(decoder) -> int:
    """Bytes of weights one decode step reads: every parameter but the embedding table."""
    embed = decoder.model.embed_tokens.weight
    total = 0
    seen = set()
    for p in decoder.parameters():
        if p is embed and not isinstance(decoder.lm_head, torch.nn.Linear) or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    if isinstance(decoder.lm_head, torch.nn.Linear) and decoder.lm_head.weight is embed:
        return total  # tied head: the table is read once, as the head
    return total - (embed.numel() * embed.element_size() if id(embed) in seen else 0)


def read_bandwidth(threads: int) -> float:
    """GB/s of a float32 sum over 512 MiB, best of 5: about what a step could read at most."""
    x = torch.ones(128 * 1024 * 1024, dtype=torch.float32)
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return best


FIRST_STEPS = 16  # the window right after the prefill (what a short answer sees)


def rates(step_seconds: list[float], batch: int) -> tuple[float, float]:
    """(tokens/s over the first FIRST_STEPS steps, tokens/s over the steps after them) summed over the
    batch; the steady rate is nan when there are no steps after the first window."""
    first, rest = step_seconds[:FIRST_STEPS], step_seconds[FIRST_STEPS:]
    return batch * len(first) / sum(first), (batch * len(rest) / sum(rest)) if rest else float("nan")


def measure(decoder, batch: int, context: int, tokens: int) -> tuple[float, float, float]:
    """(time to first token in s, decode tokens/s of the first window, of the steady window)."""
    ids = torch.randint(0, decoder.vocab_size, (batch, context), generator=torch.Generator().manual_seed(0))
    cache = decoder.new_cache(batch, context + tokens + 2)
    steps = []
    with torch.inference_mode():
        start = time.perf_counter()
        out = decoder(input_ids=ids, cache=cache, logits_to_keep=1)
        nxt = ops.argmax_last(out.logits[:, -1])[:, None]  # greedy, as generate picks
        ttft = time.perf_counter() - start
        for _ in range(tokens):
            start = time.perf_counter()
            nxt = ops.argmax_last(decoder(input_ids=nxt, cache=cache, logits_to_keep=1).logits[:, -1])[:, None]
            steps.append(time.perf_counter() - start)
    return (ttft, *rates(steps, batch))


def run_all(variants: dict, args, busy: bool = False) -> tuple[dict, dict]:
    """(quiet, busy) results: best of --rounds rounds; with ``busy``, each round runs every variant
    quiet and then with the spinner, so load from other processes falls on both legs alike."""
    quiet, loaded = {}, {}
    names = list(variants)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotated: no variant always comes first
        for results, spin in ((quiet, False), (loaded, True)) if busy else ((quiet, False),):
            spinner = subprocess.Popen(["nice", "-n", "10", sys.executable, "-c", "while True: pass"]) if spin else None
            try:
                if spinner:
                    time.sleep(1.0)  # past the start-up of a new process, when the scheduler still favours it
                for name in order:
                    for b in args.batches:
                        got = measure_variant(variants[name], b, args)
                        if got is None:
                            continue
                        old = results.get((name, b), (float("inf"), 0.0, 0.0))
                        results[(name, b)] = (min(old[0], got[0]), max(old[1], got[1]), max(old[2], got[2]))
            finally:
                if spinner:
                    spinner.kill()
                    spinner.wait()
    return quiet, loaded


def print_table(title: str, results: dict, variants: dict, nbytes: dict, bandwidth: float, args) -> None:
    print(f"\n{title}")
    steady = f"steady (steps {FIRST_STEPS + 1}-{args.tokens})"
    print(f"{'':26s} {'first ' + str(FIRST_STEPS) + ' steps':>17s} {steady:>17s}")
    print(f"{'variant':10s} {'batch':>5s} {'TTFT ms':>9s} {'tok/s':>8s} {'vs bf16':>8s} {'tok/s':>8s} {'vs bf16':>8s} "
          f"{'MB/step':>8s} {'GB/s':>6s}")
    for name in variants:
        for b in args.batches:
            if (name, b) not in results:
                continue
            ttft, first, steady = results[(name, b)]
            _, base_first, base_steady = results[("bf16", b)]
            row = (f"{name:10s} {b:5d} {ttft * 1e3:9.1f} {first:8.1f} {first / base_first:7.2f}x "
                   f"{steady:8.1f} {steady / base_steady:7.2f}x")
            if name in nbytes:  # ours: bytes read per step and the bandwidth that makes (steady)
                row += f" {nbytes[name] / 1e6:8.1f} {nbytes[name] * steady / b / 1e9:6.1f}"
            print(row)
    print(f"measured read bandwidth ({args.threads} threads): {bandwidth:.1f} GB/s")


def accuracy(variants: dict, reference, prompts: int = 8, length: int = 64) -> None:
    """Logits of every position of fixed random prompts against the float32 model (teacher-forced):
    relative RMS error and top-1 agreement (bf16's own error is the yardstick). Two ways per
    variant: one prefill over the prompts (more than MAX_ROWS rows: weight-only) and one decode
    step per position (8 rows: the decode kernels, activations quantized too)."""
    ids = torch.randint(0, reference.vocab_size, (prompts, length), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        ref = reference(input_ids=ids).logits.float()
        print(f"\naccuracy vs float32 ({prompts} prompts x {length} tokens, teacher-forced; random weights: see docs)")
        for name, dec in variants.items():
            cache = dec.new_cache(prompts, length)
            stepped = torch.cat([dec(input_ids=ids[:, t:t + 1], cache=cache).logits.float() for t in range(length)], 1)
            for how, got in (("prefill", dec(input_ids=ids).logits.float()), ("decode steps", stepped)):
                rel = ((got - ref).norm() / ref.norm()).item()
                agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
                print(f"  {name:5s} {how:12s} logits rel. RMS error {rel:.4f}   top-1 agreement {agree:.1%}")


class LlamaCpp:
    """The optional llama.cpp leg: one GGUF file of the same decoder through llama-cpp-python,
    timed like ``measure`` (batch 1 only: llama-cpp-python decodes one sequence). Decode steps
    feed a fixed token (no sampler), so only the model's step is timed, as ours."""

    def __init__(self, path: str, threads: int, n_ctx: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512,
                                   verbose=False)

    def measure(self, batch: int, context: int, tokens: int) -> tuple[float, float, float] | None:
        if batch != 1:
            return None
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(list(range(10, 10 + context)))
        ttft = time.perf_counter() - start
        steps = []
        for t in range(tokens):
            start = time.perf_counter()
            self.llm.eval([12 + t % 100])
            steps.append(time.perf_counter() - start)
        return (ttft, *rates(steps, batch))


def llama_variants(args) -> dict:
    """{"llama bf16": LlamaCpp, "llama q8_0": ..., "llama q4_0": ...} for the GGUF files found, with a note for what is missing."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama.cpp leg: skipped (llama-cpp-python is not installed; see docs/quantization.md)")
        return {}
    if not args.llama:
        print("llama.cpp leg: skipped (pass --llama DIR holding q8_0.gguf / q4_0.gguf: benchmarks/make_gguf.py)")
        return {}
    found = {}
    for fmt in ("bf16", "q8_0", "q4_0"):
        path = os.path.join(args.llama, f"{fmt}.gguf")
        if os.path.exists(path):
            found[f"llama {fmt}"] = LlamaCpp(path, args.threads, args.context + args.tokens + 8)
        else:
            print(f"llama.cpp {fmt}: {path} not found")
    return found


def measure_variant(variant, batch: int, args) -> tuple[float, float, float] | None:
    if isinstance(variant, LlamaCpp):
        return variant.measure(batch, args.context, args.tokens)
    return measure(variant, batch, args.context, args.tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--tokens", type=int, default=64,
                   help=f"decode steps per measurement: the first {FIRST_STEPS}, then the steady window (default 64)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-speed", action="store_true", help="skip the timings (with --accuracy)")
    p.add_argument("--busy", action="store_true", help="also run with one background process spinning")
    p.add_argument("--llama", default=None, help="folder with bf16.gguf / q8_0.gguf / q4_0.gguf (optional leg)")
    p.add_argument("--accuracy", action="store_true", help="also print logits error / top-1 agreement vs float32")
    args = p.parse_args()
    if args.tokens <= FIRST_STEPS:
        p.error(f"--tokens must be more than {FIRST_STEPS} (the first window), got {args.tokens}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ik.VLM(ik.VLMConfig.preset("smolvlm-256m")).to(torch.bfloat16).eval()
    variants = {"bf16": model.decoder}
    for method in ("int8", "int4"):
        q = copy.deepcopy(model.decoder)
        names = [n for n, m in q.named_modules() if type(m) is torch.nn.Linear]
        quant.quantize_modules(q, names, 8 if method == "int8" else 4, args.group_size if method == "int4" else None)
        variants[method] = q
    nbytes = {name: step_bytes(dec) for name, dec in variants.items()}
    ours = dict(variants)
    print(f"threads {args.threads}  context {args.context}  decode tokens {args.tokens}  int4 group {args.group_size}  "
          f"load avg {os.getloadavg()[0]:.1f} (other processes skew 2-thread timings)  "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    if args.no_speed:
        accuracy(ours, copy.deepcopy(model.decoder).float())
        return
    variants.update(llama_variants(args))
    bandwidth = read_bandwidth(args.threads)
    quiet, busy = run_all(variants, args, args.busy)
    print_table("quiet", quiet, variants, nbytes, bandwidth, args)
    if args.busy:
        print_table("busy (one background process spinning at nice 10; rounds interleaved with the quiet ones)",
                    busy, variants, nbytes, bandwidth, args)
        for window, i in ((f"first {FIRST_STEPS} steps", 1), ("steady", 2)):
            print(f"\nbusy / quiet decode tokens/s, {window}: " + "   ".join(
                f"{name} b{b} {busy[(name, b)][i] / quiet[(name, b)][i]:.0%}" for name in variants
                for b in args.batches if (name, b) in quiet))
    if args.accuracy:
        accuracy(ours, copy.deepcopy(model.decoder).float())


if __name__ == "__main__":
    main()
