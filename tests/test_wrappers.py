"""The wrapper matrix: what users wrap a model in never meets an error of ours.

For each of peft LoRA, torchao int8 weight-only, the activation-checkpoint wrapper, FSDP2 over 2
gloo processes and DTensor tensor parallelism over 2 gloo processes: ``generate`` gives the ids
the unwrapped model gives (fp32 greedy; quantized: the ids of the quantized model run through the
reference path), and ``save_pretrained`` writes a checkpoint that loads back and generates the same.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import idefics3_kit as ik
from idefics3_kit import ops
from idefics3_kit.components.decoder import DecoderLayer
from idefics3_kit.components.vision import SiglipEncoderLayer

GEN = dict(max_new_tokens=6, eos_token_id=[])


def _model_and_batch():
    torch.manual_seed(0)
    model = ik.VLM(ik.VLMConfig.preset("tiny")).eval()
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.image_token_id, (2, 12), generator=g)
    ids[:, 2:2 + cfg.image_seq_len] = cfg.image_token_id  # one tile per sample
    size = cfg.vision.image_size
    pixels = torch.randn(2, 1, 3, size, size, generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row
    return model, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)


def _generate(model, batch):
    return model.generate(**batch, **GEN)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_checkpoint_wrapper(tmp_path, dtype):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    model, batch = _model_and_batch()
    model = model.to(dtype)
    expected = _generate(model, batch)
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, (DecoderLayer, SiglipEncoderLayer)))
    assert type(model.decoder.model.layers[0]) is not DecoderLayer  # wrapped
    assert torch.equal(_generate(model, batch), expected)
    model.save_pretrained(tmp_path)
    assert "_checkpoint_wrapped_module" not in json.dumps(_saved_names(tmp_path))
    assert torch.equal(_generate(ik.VLM.from_pretrained(tmp_path), batch), expected)
    # and it trains through the wrapper
    model.train()
    out = model(**{k: v for k, v in batch.items()}, labels=batch["input_ids"])
    out.loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_lora(tmp_path, dtype):
    peft = pytest.importorskip("peft")
    model, batch = _model_and_batch()
    model = model.to(dtype)
    expected = _generate(model, batch)
    peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]))
    assert torch.equal(_generate(model, batch), expected)  # B starts at zero: the model is unchanged
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapted = _generate(model, batch)
    model.save_pretrained(tmp_path)  # the adapters merged into the base weights
    assert not any("lora" in n or "base_layer" in n for n in _saved_names(tmp_path))
    back = ik.VLM.from_pretrained(tmp_path)
    if dtype == torch.float32:  # bf16: merging rounds W + BA once more than the adapter path does
        assert torch.equal(_generate(back, batch), adapted)
        assert not torch.equal(adapted, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torchao_int8_weight_only(tmp_path, dtype):
    quantization = pytest.importorskip("torchao.quantization")
    model, batch = _model_and_batch()
    model = model.to(dtype)
    quantization.quantize_(model.decoder, quantization.Int8WeightOnlyConfig())
    weight = model.decoder.model.layers[0].self_attn.q_proj.weight
    assert type(weight) not in (torch.Tensor, torch.nn.Parameter)  # a quantized tensor subclass
    got = _generate(model, batch)
    with ops.use_reference():
        reference = _generate(model, batch)
    assert torch.equal(got, reference)
    model.save_pretrained(tmp_path)  # stored dequantized: a plain checkpoint
    assert torch.equal(_generate(ik.VLM.from_pretrained(tmp_path), batch), got)


def _saved_names(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        return list(f.keys())


# ---- 2 processes, gloo on the CPU --------------------------------------------------------------


def _distributed_worker(rank: int, world: int, init_file: str, mode: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model, batch = _model_and_batch()
        expected = _generate(model, batch)
        mesh = init_device_mesh("cpu", (world,))
        if mode == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for layer in [*model.decoder.model.layers, *model.vision.encoder.layers]:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        else:
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                    "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
                    "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
                    "mlp.down_proj": RowwiseParallel()}
            for layer in model.decoder.model.layers:
                parallelize_module(layer, mesh, plan)
        got = _generate(model, batch)
        model.save_pretrained(out_dir)  # a collective: every rank gathers, rank 0 writes
        dist.barrier()
        result = {"equal": torch.equal(got, expected)}
        if rank == 0:
            result["reloaded_equal"] = torch.equal(_generate(ik.VLM.from_pretrained(out_dir), batch), expected)
        with open(os.path.join(os.path.dirname(init_file), f"result{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["fsdp2", "tensor_parallel"])
def test_distributed_wrappers(tmp_path, mode):
    import torch.multiprocessing as mp

    init_file = str(tmp_path / "init")
    mp.spawn(_distributed_worker, args=(2, init_file, mode, str(tmp_path / "ckpt")), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(2)]
    assert all(r["equal"] for r in results), results
    assert results[0]["reloaded_equal"]


def test_wrapped_model_copy_is_independent():
    """deepcopy of a model whose decode weights were packed never copies the packs (kept off modules)."""
    model, batch = _model_and_batch()
    model = model.to(torch.bfloat16)
    _generate(model, batch)
    twin = copy.deepcopy(model)
    assert torch.equal(_generate(twin, batch), _generate(model, batch))
