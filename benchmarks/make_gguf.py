"""GGUF files of benchmarks/quant.py's decoder, for its optional llama.cpp leg (issue 21).

    python benchmarks/make_gguf.py --llama-cpp SRC --out DIR

SRC is llama.cpp's source tree (the ``vendor/llama.cpp`` folder of the llama-cpp-python sdist:
it holds ``convert_hf_to_gguf.py`` and ``gguf-py``). The script:

1. builds quant.py's model (``VLMConfig.preset("smolvlm-256m")``, random weights, seed 0) and
   saves its decoder as a transformers ``LlamaForCausalLM`` checkpoint (the names already match);
2. gives it a SentencePiece tokenizer trained on this repository's docs. llama.cpp's converter
   needs some tokenizer; the real SmolLM2 one is on the Hub, out of reach here. The converter pads
   the vocabulary to the checkpoint's 49280 entries, so the embedding and LM head keep their shapes;
3. converts it with llama.cpp's bundled converter to ``bf16.gguf``;
4. quantizes that to ``q8_0.gguf`` and ``q4_0.gguf`` with llama-cpp-python's
   ``llama_model_quantize`` (the library's own quantizer; the ``llama-quantize`` tool is not
   built by pip).

Needs ``sentencepiece`` and ``llama-cpp-python`` (built from its sdist; see docs/quantization.md).
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import idefics3_kit as ik  # noqa: E402

LLAMA_FTYPES = {"q8_0": 7, "q4_0": 2}  # llama.h: LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_Q4_0


def save_llama_checkpoint(out: str) -> None:
    """quant.py's decoder as a transformers Llama checkpoint in ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = ik.VLM(ik.VLMConfig.preset("smolvlm-256m"))
    cfg = model.config.decoder
    hf_config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                            intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                            num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                            head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                            max_position_embeddings=cfg.max_position_embeddings,
                            tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0)
    hf = LlamaForCausalLM(hf_config)
    missing, unexpected = hf.load_state_dict(model.decoder.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"decoder -> Llama names differ: missing {missing}, unexpected {unexpected}")
    hf.to(torch.bfloat16).save_pretrained(out)


def train_tokenizer(out: str) -> None:
    """A small SentencePiece model (tokenizer.model) trained on the repository's markdown."""
    import sentencepiece as spm

    docs = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))) + [os.path.join(ROOT, "README.md")]
    spm.SentencePieceTrainer.train(input=",".join(docs), model_prefix=os.path.join(out, "tokenizer"),
                                   vocab_size=2000, model_type="bpe", hard_vocab_limit=False,
                                   bos_id=1, eos_id=2, unk_id=3, pad_id=0, minloglevel=2)


def convert(src: str, out: str) -> str:
    target = os.path.join(out, "bf16.gguf")
    env = {**os.environ, "PYTHONPATH": os.path.join(src, "gguf-py")}
    done = subprocess.run([sys.executable, os.path.join(src, "convert_hf_to_gguf.py"), out, "--outtype", "bf16",
                           "--outfile", target], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({done.returncode}):\n{done.stderr[-4000:]}")
    print(f"wrote {target} ({os.path.getsize(target) / 1e6:.1f} MB)")
    return target


def quantize(source: str, out: str) -> None:
    import llama_cpp

    for name, ftype in LLAMA_FTYPES.items():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = 2
        target = os.path.join(out, f"{name}.gguf")
        status = llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params))
        if status != 0:
            raise RuntimeError(f"llama_model_quantize({name}) returned {status}")
        print(f"wrote {target} ({os.path.getsize(target) / 1e6:.1f} MB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-cpp", required=True, help="llama.cpp source tree (convert_hf_to_gguf.py, gguf-py)")
    p.add_argument("--out", required=True, help="folder for the checkpoint and the .gguf files")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    save_llama_checkpoint(args.out)
    train_tokenizer(args.out)
    quantize(convert(args.llama_cpp, args.out), args.out)


if __name__ == "__main__":
    main()
