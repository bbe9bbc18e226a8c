"""Decode tokens/s and time to first token: idefics3_kit vs transformers, side by side in one run.

SmolVLM-256M shapes (``ik.VLMConfig.preset("smolvlm-256m")``) with random weights, saved once
with ``save_pretrained`` and loaded by both libraries, so both run the same weights. Each
prompt is one 512x512 image tile (64 image tokens) plus ``--text-tokens`` text tokens; greedy
decoding with ``min_new_tokens`` so nobody stops early.

    time to first token = call start to the first new token (vision + prefill + 1 token)
    decode tokens/s     = B / median time between consecutive new tokens

Usage: python benchmarks/generate.py [--threads 2] [--new-tokens 32] [--repeats 3]
                                      [--dtypes fp32 bf16] [--batches 1 4] [--preset smolvlm-256m]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import idefics3_kit as ik  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def narrow(cfg: ik.VLMConfig) -> ik.VLMConfig:
    """Same number of decoder layers, tiny widths: the matmuls vanish, the per-step overhead remains."""
    tiny = ik.VLMConfig.preset("tiny")
    dec = cfg.decoder.replace(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=16, vocab_size=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return cfg.replace(vision=tiny.vision, connector=tiny.connector.replace(in_dim=0, out_dim=0), decoder=dec,
                       image_token_id=1000)


def save_random_model(path: str, cfg: ik.VLMConfig) -> ik.VLMConfig:
    """A model of ``cfg`` with seeded small random weights (activations stay in a sane range),
    saved with save_pretrained so that both libraries load the same weights."""
    torch.manual_seed(0)
    model = ik.VLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    model.save_pretrained(path)
    return cfg


def make_checkpoint(path: str, preset: str = "smolvlm-256m", narrow_widths: bool = False) -> ik.VLMConfig:
    cfg = ik.VLMConfig.preset(preset)
    return save_random_model(path, narrow(cfg) if narrow_widths else cfg)


def make_batch(cfg: ik.VLMConfig, batch: int, text_tokens: int) -> dict:
    g = torch.Generator().manual_seed(1)
    s, size = cfg.image_seq_len, cfg.vision.image_size
    rows = []
    for _ in range(batch):
        text = torch.randint(10, min(40000, cfg.decoder.vocab_size - 1), (text_tokens,), generator=g)
        text[text == cfg.image_token_id] = 10
        rows.append(torch.cat([text[:4], torch.full((s,), cfg.image_token_id), text[4:]]))
    ids = torch.stack(rows)
    pv = torch.rand(batch, 1, 3, size, size, generator=g) * 2 - 1
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv,
                pixel_attention_mask=torch.ones(batch, 1, size, size, dtype=torch.long))


class StepClock:
    """A streamer (``put``/``end``, accepted by both libraries) that timestamps every step."""

    def __init__(self, skip_first_put: bool):
        self.skip = skip_first_put  # both libraries first put the prompt, before the prefill
        self.times = []

    def put(self, ids):
        if self.skip:
            self.skip = False
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def measure_pair(gens: dict, batch: dict, new_tokens: int, repeats: int, dtype) -> dict:
    """Interleave the libraries (ours, hf, ours, hf, ...) so CPU contention hits both alike.

    TTFT: best of ``repeats`` (call start to the first new token). Decode: the median time
    between consecutive tokens over all steps of all repeats (robust to bursts of load).
    """
    b = {k: (v.to(dtype) if k == "pixel_values" else v) for k, v in batch.items()}
    bsz = batch["input_ids"].shape[0]
    for gen in gens.values():
        gen(b, 2, StepClock(gen.skip_first_put))  # warm-up
    ttft = {name: float("inf") for name in gens}
    steps = {name: [] for name in gens}
    ids = {}
    for _ in range(repeats):
        for name, gen in gens.items():
            clock = StepClock(gen.skip_first_put)
            t0 = time.perf_counter()
            ids[name] = gen(b, new_tokens, clock)
            ttft[name] = min(ttft[name], clock.times[0] - t0)
            steps[name] += [t2 - t1 for t1, t2 in zip(clock.times, clock.times[1:])]
    return {name: {"ttft": ttft[name], "ids": ids[name], "decode_tps": bsz / statistics.median(steps[name])}
            for name in gens}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--text-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--preset", default="smolvlm-256m",
                    help="model shapes (default smolvlm-256m; 'tiny' shows the per-step overhead alone)")
    ap.add_argument("--narrow", action="store_true",
                    help="keep the preset's layer count but tiny widths: measures the per-step overhead alone")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import Idefics3ForConditionalGeneration

    with tempfile.TemporaryDirectory() as path:
        cfg = make_checkpoint(path, args.preset, args.narrow)
        n = args.new_tokens
        print(f"{args.preset}{' (narrow widths)' if args.narrow else ''} shapes, random weights; {args.threads} threads; prompt = 1 tile "
              f"({cfg.image_seq_len} image tokens) + {args.text_tokens} text tokens; {n} new tokens; "
              f"best of {args.repeats}; torch {torch.__version__}")
        print(f"{'dtype':5s} {'batch':>5s} | {'TTFT ours':>10s} {'TTFT hf':>10s} {'hf/ours':>8s} | "
              f"{'tok/s ours':>10s} {'tok/s hf':>10s} {'ours/hf':>8s} | same ids")
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            ours = ik.VLM.from_pretrained(path, dtype=dtype)
            hf = Idefics3ForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()

            def gen_ours(b, k, clock):
                return ours.generate(**b, max_new_tokens=k, min_new_tokens=k, do_sample=False, streamer=clock)

            def gen_hf(b, k, clock):
                with torch.inference_mode():
                    return hf.generate(**b, max_new_tokens=k, min_new_tokens=k, do_sample=False, streamer=clock)

            gen_ours.skip_first_put = gen_hf.skip_first_put = True  # both put the prompt first

            for bsz in args.batches:
                batch = make_batch(cfg, bsz, args.text_tokens)
                r = measure_pair({"ours": gen_ours, "hf": gen_hf}, batch, n, args.repeats, dtype)
                o, h = r["ours"], r["hf"]
                same = torch.equal(o["ids"], h["ids"])
                print(f"{dname:5s} {bsz:5d} | {o['ttft'] * 1e3:8.0f}ms {h['ttft'] * 1e3:8.0f}ms "
                      f"{h['ttft'] / o['ttft']:7.2f}x | {o['decode_tps']:10.1f} {h['decode_tps']:10.1f} "
                      f"{o['decode_tps'] / h['decode_tps']:7.2f}x | {same}", flush=True)
            del ours, hf
    return 0


if __name__ == "__main__":
    sys.exit(main())
