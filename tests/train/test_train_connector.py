"""Training only the connector of a SigLIP + Qwen2 variant: the loss falls, nothing else moves."""

import torch

import idefics3_kit as ik
from tests.backbone_ckpts import qwen2_checkpoint, siglip_checkpoint


def test_connector_only_training(tmp_path):
    siglip_checkpoint(tmp_path / "siglip", seed=21)
    qwen2_checkpoint(tmp_path / "qwen2", seed=22, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = ik.VLM.from_parts(vision=tmp_path / "siglip", decoder=tmp_path / "qwen2", connector="mlp")
    image = model.image_token_id  # appended token, 128

    model.requires_grad_(False)
    model.connector.requires_grad_(True)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("connector.")}
    conn_before = {n: p.detach().clone() for n, p in model.connector.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.connector.parameters()}

    # two samples, one tile each (4 image tokens), and a caption that depends on the image
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 1, 3, 32, 32, generator=g)
    captions = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    ids = torch.cat([torch.full((2, 1), 1), torch.full((2, 4), image), captions], dim=1)  # [2, 9]
    labels = ids.clone()
    labels[:, :5] = -100  # learn the caption only

    opt = torch.optim.AdamW(trainable, lr=3e-3)
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())

    assert losses[-1] < 0.8 * losses[0], losses
    for n, p in model.named_parameters():
        if n.startswith("connector."):
            assert not torch.equal(p, conn_before[n[len("connector."):]]), n
        else:
            assert p.grad is None, n
            assert torch.equal(p, frozen[n]), n
