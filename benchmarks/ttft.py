"""Time to first token for an image question: idefics3_kit vs transformers, side by side in one run.

SmolVLM-256M geometry (random weights, saved once with save_pretrained and loaded by both), a
1600x900 photo (13 tiles of 512x512: 832 image tokens) or two of them, greedy. Per stage:

    processor    text + images -> ids and pixel tiles          (each library's own processor)
    vision       the SigLIP tower over the real tiles           (model.vision / vision_model)
    connector    pixel shuffle + projection
    prefill      merge into the text embeddings + the decoder over the whole prompt (last logits)
    first token  argmax of the last logits
    TTFT         the whole path through each library's public calls: processor(...) then
                 generate(max_new_tokens=1)

The legs are interleaved (ours, transformers, ours, ...) so load from other processes hits
both alike; best-of and median of ``--repeats`` rounds are printed. The vision tower's achieved
GFLOP/s is printed next to this machine's measured matmul peak for the dtype, two ways: the
burst peak (the best of a few single GEMMs through torch.matmul, measured once) and the
sustained peak (the tower's own GEMMs back to back, timed in every round right before our
vision stage; per-round ratios and their median are printed). ``--openvino`` adds
optimum-intel's OpenVINO export of the same checkpoint (TTFT only), run by
benchmarks/_openvino_worker.py under ``--openvino-python``, a separate venv (docs/performance.md
has its install lines); its export is not counted.

Ours runs as ``idefics3-kit chat`` and the server run it: with ``VLM.enable_packed_weights(
decoder_max_bytes=SERVING_DECODER_PACK_BYTES)`` (the tower's linear weights, and a small decoder's,
packed once for oneDNN; a no-op where oneDNN has no bf16 matmul).
``--compare-unpacked`` adds a leg with the library's default (no packed copies).

Usage: python benchmarks/ttft.py [--threads 2] [--repeats 3] [--dtypes bf16 fp32] [--images 1 2]
                                 [--no-hf] [--openvino [--openvino-python PY]] [--feature-cache]
                                 [--compare-plain] [--compare-unpacked]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import idefics3_kit as ik  # noqa: E402
from idefics3_kit.model import SERVING_DECODER_PACK_BYTES  # noqa: E402
from benchmarks.generate import save_random_model  # noqa: E402
from tests.processor_checkpoints import make_checkpoint as make_processor_checkpoint  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PHOTO = ROOT.parent / "shared" / "data" / "images" / "rocket.jpg"
OV_PYTHON = "/work/ovenv/bin/python"


# ---- the checkpoint and the prompt ---------------------------------------------------------------

def make_checkpoint(path: str) -> ik.VLMConfig:
    """SmolVLM-256M shapes, random weights, the test processor (tiny BPE) with the real geometry."""
    from transformers import AutoTokenizer

    make_processor_checkpoint(path, flavour="smol", longest_edge=2048, tile=512, image_seq_len=64)
    image_token = AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("<image>")
    return save_random_model(path, ik.VLMConfig.preset("smolvlm-256m").replace(image_token_id=image_token))


def photo(width: int = 1600, height: int = 900):
    from PIL import Image

    if PHOTO.exists():
        return Image.open(PHOTO).convert("RGB").resize((width, height), Image.BICUBIC)
    from tests.processor_checkpoints import gradient_image

    return gradient_image(width, height)


def prompt_for(processor, n_images: int) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": "What is in this picture? Describe it."}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


# ---- the machine's matmul peak -------------------------------------------------------------------

def gemm_dtype(dtype):
    """The dtype the tower's GEMMs run in: bf16 runs as float32 on a CPU where oneDNN has no bf16
    matmul (AVX2 only: ops/dense_linear.py), so that is the peak to compare with there; torch's
    own bf16 matmul on such a CPU is a slow fallback (minutes for the 4096^3 GEMM)."""
    from idefics3_kit.ops import _library

    return torch.float32 if dtype == torch.bfloat16 and not _library.onednn_bf16() else dtype


def matmul_peak(dtype, threads: int) -> dict:
    """GFLOP/s of torch.matmul, best of a few runs: {"tower shapes": the vision linears' own shapes
    (K = 768 / 3072), "square": a large 4096^3 GEMM (closer to the matrix unit's peak)}."""
    dtype = gemm_dtype(dtype)

    def best(m, k, n):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        torch.matmul(a, b)
        top = 0.0
        for _ in range(3):
            t = time.perf_counter()
            torch.matmul(a, b)
            top = max(top, 2 * m * k * n / (time.perf_counter() - t) / 1e9)
        return top

    return {"tower shapes": max(best(8192, 768, 3072), best(8192, 3072, 768)), "square": best(4096, 4096, 4096)}


def tower_gemms(cfg: ik.VLMConfig, tiles: int, tiles_per_call: int, dtype) -> tuple:
    """(a zero-argument callable, its FLOPs): the vision tower's own linear GEMMs back to back,
    through torch.matmul, with random operands of the tower's shapes (one weight set per layer,
    as the tower reads them; the rows in the tower's chunks of ``tiles_per_call`` tiles, which also
    run the GEMMs ~10% faster than one call over all rows): the sustained matmul peak at the
    tower's shapes. It runs inside the interleaved rounds, right before our vision stage, so each
    round's tower speed is compared with the matmul speed of the same moment; the burst peak above
    (best of three single GEMMs, measured once) swings with this host's phases by more than the gap
    being measured (docs/performance.md, "The yardstick")."""
    v = cfg.vision
    dtype = gemm_dtype(dtype)
    per_tile = (v.image_size // v.patch_size) ** 2
    rows, chunk = tiles * per_tile, tiles_per_call * per_tile
    d, f = v.hidden_size, v.intermediate_size
    shapes = [(d, d)] * 4 + [(d, f), (f, d)]
    inputs = {k: torch.randn(rows, k, dtype=dtype) for k in (d, f)}
    weights = [[torch.randn(k, n, dtype=dtype) * 0.02 for k, n in shapes] for _ in range(v.num_hidden_layers)]

    def run():
        for first in range(0, rows, chunk):
            for layer in weights:
                for w in layer:
                    torch.matmul(inputs[w.shape[0]][first:first + chunk], w)

    return run, v.num_hidden_layers * sum(2 * rows * k * n for k, n in shapes)


def vision_flops(cfg: ik.VLMConfig, tiles: int) -> float:
    """Multiply-adds x2 of the SigLIP tower over ``tiles`` full tiles (linears, attention, patch conv)."""
    v = cfg.vision
    p = (v.image_size // v.patch_size) ** 2
    d, f = v.hidden_size, v.intermediate_size
    per_layer = 2 * p * (4 * d * d + 2 * d * f) + 2 * 2 * p * p * d
    patch = 2 * p * d * 3 * v.patch_size ** 2
    return tiles * (v.num_hidden_layers * per_layer + patch)


# ---- the stages ----------------------------------------------------------------------------------

def decoder_stages(model, state: dict) -> dict:
    """Prefill and first token, the same call in both libraries (each model's own forward)."""
    def prefill():
        b = state["batch"]
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    image_hidden_states=state["features"], logits_to_keep=1)
        state["logits"] = out.logits

    def first_token():
        state["token"] = int(state["logits"][0, -1].argmax())

    return {"prefill": prefill, "first token": first_token}


def ours_stages(model, processor, text, images):
    """Zero-argument callables, one per stage, each over the previous stage's saved output."""
    state = {}

    def process():
        state["batch"] = processor(text=[text], images=[images], return_tensors="pt")

    def vision():
        b = state["batch"]
        pixels, patch_mask = model.real_tiles(b["pixel_values"], b["pixel_attention_mask"])
        state["tiles"] = model.run_vision_tower(pixels, patch_mask)  # what encode_tiles runs before the connector

    def connector():
        state["features"] = model.connector(state["tiles"])

    def ttft():
        b = processor(text=[text], images=[images], return_tensors="pt")
        state["ttft_ids"] = model.generate(**b, max_new_tokens=1)

    return {"processor": process, "vision": vision, "connector": connector, **decoder_stages(model, state),
            "TTFT": ttft}, state


def hf_stages(model, processor, text, images, dtype):
    state = {}

    def process():
        state["batch"] = processor(text=[text], images=[images], return_tensors="pt")

    def vision():
        b = state["batch"]
        pv = b["pixel_values"].to(dtype)
        n = pv.shape[0] * pv.shape[1]
        pv = pv.reshape(n, *pv.shape[2:])
        pm = b["pixel_attention_mask"].reshape(n, *pv.shape[2:])
        real = (pv != 0).flatten(1).any(dim=1)
        pv, pm = pv[real], pm[real]
        p = model.config.vision_config.patch_size
        patch_mask = pm.unfold(1, p, p).unfold(2, p, p).sum(dim=(-1, -2)) > 0
        state["tiles"] = model.model.vision_model(pixel_values=pv, patch_attention_mask=patch_mask).last_hidden_state

    def connector():
        state["features"] = model.model.connector(state["tiles"])

    def ttft():
        b = processor(text=[text], images=[images], return_tensors="pt")
        b["pixel_values"] = b["pixel_values"].to(dtype)
        state["ttft_ids"] = model.generate(**b, max_new_tokens=1, do_sample=False)

    return {"processor": process, "vision": vision, "connector": connector, **decoder_stages(model, state),
            "TTFT": ttft}, state


class OpenVINO:
    """optimum-intel's export of the same checkpoint, served by benchmarks/_openvino_worker.py in its
    own venv (optimum-intel pins an older transformers than ours; docs/performance.md installs it)."""

    def __init__(self, python: str, path: str, image, dtype_name: str, threads: int):
        image_path = str(Path(path) / "ttft_photo.png")
        image.save(image_path)  # lossless: the worker sees the same pixels
        self.log = open(Path(path) / f"openvino_worker_{dtype_name}.log", "w")  # noqa: SIM115 (the worker's stderr)
        self.proc = subprocess.Popen([python, str(ROOT / "benchmarks" / "_openvino_worker.py"), path, image_path,
                                      dtype_name, str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, bufsize=1)
        print(f"openvino {dtype_name}: export + load took {float(self.reply('ready')[0]):.1f} s (not counted)")
        self.token = None

    def reply(self, expect: str | None = None) -> list[str]:
        line = self.proc.stdout.readline().strip()
        if not line or line.startswith("error") or (expect and not line.startswith(expect)):
            self.proc.kill()
            self.proc.wait()
            tail = "".join(Path(self.log.name).read_text().splitlines(keepends=True)[-5:])
            raise RuntimeError(f"openvino worker: {line or 'exited'}; the end of its log:\n{tail}")
        return line.split()[1:] if expect else line.split()

    def ttft(self, text: str, n_images: int):
        """A zero-argument callable: one question through the worker; returns the worker's seconds."""
        def run() -> float:
            self.proc.stdin.write(f"run {n_images} {json.dumps(text)}\n")
            seconds, token = self.reply()
            self.token = int(token)
            return float(seconds)

        return run

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.log.close()


def with_env(fn, **env):
    """``fn`` run with these environment variables set (restored after)."""
    def run():
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return run


# ---- timing --------------------------------------------------------------------------------------

def interleaved(legs: dict, repeats: int) -> dict:
    """{leg: {stage: [seconds per round]}}; the legs' stages run in order, the legs alternate.

    A stage that returns a number reports its own seconds (the OpenVINO worker's, without the pipe)."""
    for stages in legs.values():  # warm-up round
        for fn in stages.values():
            fn()
    times = {leg: {stage: [] for stage in stages} for leg, stages in legs.items()}
    for _ in range(repeats):
        for leg, stages in legs.items():
            for stage, fn in stages.items():
                t = time.perf_counter()
                took = fn()
                times[leg][stage].append(took if took is not None else time.perf_counter() - t)
    return times


def report(times: dict, flops: float, peak: dict, label: str, sustained: tuple | None = None) -> None:
    """The per-stage table; ``sustained`` = ([seconds per round], FLOPs) of tower_gemms."""
    legs = [leg for leg in times if leg != "peak"]
    stages = list(times[legs[0]])
    print(f"\n{label}")
    header = " | ".join(f"{leg + ' best':>12s} {leg + ' med':>11s}" for leg in legs)
    others = [leg for leg in ("hf", "plain", "unpacked") if leg in legs]  # each gets a "<leg>/ours" ratio column
    print(f"{'stage':12s} | {header}" + "".join(f" | {leg}/ours (best)" for leg in others))
    for stage in stages:
        row = []
        for leg in legs:
            ts = times[leg].get(stage)
            row.append(f"{min(ts):12.3f} {statistics.median(ts):11.3f}" if ts else f"{'-':>12s} {'-':>11s}")
        ratio = ""
        for leg in others:
            if times[leg].get(stage) and times["ours"].get(stage):
                ratio += f" | {min(times[leg][stage]) / min(times['ours'][stage]):13.2f}x"
        print(f"{stage:12s} | " + " | ".join(row) + ratio)
    for leg in legs:
        if times[leg].get("vision"):
            gflops = flops / min(times[leg]["vision"]) / 1e9
            shares = ", ".join(f"{gflops / p:5.1%} of the {name} matmul peak {p:.0f}" for name, p in peak.items())
            print(f"vision tower ({leg}): {gflops:7.1f} GFLOP/s = {shares} GFLOP/s (burst peaks)")
    if sustained is not None:
        gemm_seconds, gemm_flops = sustained
        tower = [flops / t / 1e9 for t in times["ours"]["vision"]]
        gemm = [gemm_flops / t / 1e9 for t in gemm_seconds]
        per_round = [a / b for a, b in zip(tower, gemm)]
        print(f"vision tower (ours) vs the sustained peak (the tower's GEMMs alone, in its chunks, same rounds): "
              f"best {max(tower):.0f} / {max(gemm):.0f} GFLOP/s = {max(tower) / max(gemm):.1%}; "
              f"per round {', '.join(f'{r:.1%}' for r in per_round)} (median {statistics.median(per_round):.1%})")
    if "openvino" in times and "TTFT" in times["ours"]:
        print(f"TTFT openvino/ours (best): {min(times['openvino']['TTFT']) / min(times['ours']['TTFT']):.2f}x")
    ours_ttft = times["ours"].get("TTFT")
    for leg in ("hf", "openvino"):
        if leg in times and times[leg].get("TTFT") and ours_ttft:
            ts = times[leg]["TTFT"]
            print(f"TTFT {leg}/ours: best {min(ts) / min(ours_ttft):.2f}x, "
                  f"median {statistics.median(ts) / statistics.median(ours_ttft):.2f}x")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    ap.add_argument("--images", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--no-hf", action="store_true", help="ours only (no transformers leg)")
    ap.add_argument("--openvino", action="store_true", help="add optimum-intel's OpenVINO leg (TTFT)")
    ap.add_argument("--openvino-python", default=OV_PYTHON if Path(OV_PYTHON).exists() else None,
                    help=f"python of the venv with optimum-intel (default {OV_PYTHON} when it exists)")
    ap.add_argument("--compare-plain", action="store_true",
                    help="add a leg 'plain': ours with the fused many-row linears off (IDEFICS3_KIT_DENSE=0)")
    ap.add_argument("--compare-unpacked", action="store_true",
                    help="add ours without packed weights (VLM.enable_packed_weights off: the library's default)")
    ap.add_argument("--feature-cache", action="store_true",
                    help="also time a second question about the same image with the vision-feature cache on")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.openvino and args.openvino_python is None:
        print(f"(openvino leg skipped: no {OV_PYTHON}; docs/performance.md installs it)")
        args.openvino = False

    with tempfile.TemporaryDirectory() as path:
        cfg = make_checkpoint(path)
        image = photo()
        processor = ik.Processor.from_pretrained(path)
        print(f"SmolVLM-256M shapes, random weights; {args.threads} threads; torch {torch.__version__}; "
              f"one 1600x900 image = 13 tiles of 512x512 (832 image tokens); interleaved, {args.repeats} rounds")
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            peak = matmul_peak(dtype, args.threads)
            if gemm_dtype(dtype) != dtype:
                print(f"({dname}: this CPU has no oneDNN bf16 matmul, so bf16 GEMMs run as float32 on the upcasts "
                      f"and the peaks below are float32's)")
            ours = ik.VLM.from_pretrained(path, dtype=dtype).eval()
            packed = ours.enable_packed_weights(decoder_max_bytes=SERVING_DECODER_PACK_BYTES)  # as chat and serve
            print(f"ours ({dname}): packed weights {packed / 2 ** 20:.0f} MiB")
            unpacked = ik.VLM.from_pretrained(path, dtype=dtype).eval() if args.compare_unpacked else None
            hf = hf_processor = None
            if not args.no_hf:
                from transformers import Idefics3ForConditionalGeneration

                from tests.processor_checkpoints import hf_processor as load_hf_processor

                hf = Idefics3ForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
                hf_processor = load_hf_processor(path)
            ov = OpenVINO(args.openvino_python, path, image, dname, args.threads) if args.openvino else None
            for n_images in args.images:
                images = [image] * n_images
                text = prompt_for(processor, n_images)
                legs = {}
                legs["ours"], ours_state = ours_stages(ours, processor, text, images)
                if unpacked is not None:
                    legs["unpacked"], _ = ours_stages(unpacked, processor, text, images)
                if args.compare_plain:
                    plain, _ = ours_stages(ours, processor, text, images)
                    legs["plain"] = {stage: with_env(fn, IDEFICS3_KIT_DENSE="0") for stage, fn in plain.items()}
                if hf is not None:
                    legs["hf"], hf_state = hf_stages(hf, hf_processor, text, images, dtype)
                if ov is not None:
                    legs["openvino"] = {"TTFT": ov.ttft(text, n_images)}
                batch = processor(text=[text], images=[images], return_tensors="pt")
                pixels = ours.real_tiles(batch["pixel_values"], batch["pixel_attention_mask"])[0].to(dtype)
                tiles = int(pixels.shape[0])
                with torch.inference_mode():  # the chunking of inference (a training step runs one call)
                    per_call = ours._tiles_per_call(pixels)
                gemms, gemm_flops = tower_gemms(cfg, tiles, per_call, dtype)
                legs = {"peak": {"tower GEMMs": gemms}, **legs}  # right before our vision stage
                with torch.inference_mode():
                    times = interleaved(legs, args.repeats)
                tokens = int(ours_state["batch"]["input_ids"].shape[1])
                report(times, vision_flops(cfg, tiles), peak,
                       f"{dname}, {n_images} image(s): {tiles} tiles, {tokens} prompt tokens "
                       f"(seconds; vision {vision_flops(cfg, tiles) / 1e12:.2f} TFLOP)",
                       sustained=(times["peak"]["tower GEMMs"], gemm_flops))
                if hf is not None:
                    same = torch.equal(ours_state["ttft_ids"][:, -1], hf_state["ttft_ids"][:, -1])
                    print(f"first token ours == transformers: {same}")
                if ov is not None:
                    print(f"first token ours == openvino: {ov.token == int(ours_state['ttft_ids'][0, -1])}")
                if args.feature_cache:
                    cached_question(ours, processor, text, images, args.repeats)
            if ov is not None:
                ov.close()
    return 0


def cached_question(model, processor, text, images, repeats: int) -> None:
    """TTFT of a follow-up question about the same image, the vision-feature cache on vs off."""
    batch = processor(text=[text], images=[images], return_tensors="pt")
    model.enable_feature_cache()
    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=1)  # fills the cache
        best = {}
        for label, on in (("cache on", True), ("cache off", False)):
            if not on:
                model.disable_feature_cache()
            ts = []
            for _ in range(repeats):
                t = time.perf_counter()
                b = processor(text=[text], images=[images], return_tensors="pt")
                model.generate(**b, max_new_tokens=1)
                ts.append(time.perf_counter() - t)
            best[label] = min(ts)
    print(f"second question, same image: TTFT {best['cache on']:.3f} s with the feature cache, "
          f"{best['cache off']:.3f} s without ({best['cache off'] / best['cache on']:.1f}x)")


if __name__ == "__main__":
    sys.exit(main())
