"""A BoT training step of an ev-reid model on an ev-core LITv2 backbone, with ev-compress's Mesa."""

import torch

from ev_compress import mesa
from ev_reid.losses import batch_hard_triplet_loss, label_smoothed_cross_entropy
from ev_reid.models import ReidModel, ReidModelConfig

TINY_LITV2 = {
    "embed_dim": 16,
    "depths": [1, 1, 2, 1],
    "num_heads": [1, 2, 4, 8],
    "drop_path_rate": 0.0,
}


def _bot_loss(model: ReidModel, x: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    out = model(x)
    assert out.logits is not None
    triplet, _, _ = batch_hard_triplet_loss(out.features, pids, margin=0.3)
    return label_smoothed_cross_entropy(out.logits, pids, epsilon=0.1) + triplet


def test_reid_litv2_training_step_under_mesa(restore_rng: None) -> None:
    torch.manual_seed(0)
    cfg = ReidModelConfig(backbone="litv2_s", backbone_kwargs=TINY_LITV2, num_classes=4)
    model, reference = ReidModel(cfg), ReidModel(cfg)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(8, 3, 64, 32)  # re-id aspect ratio 2:1: LITv2 pads non-square maps
    pids = torch.arange(4).repeat_interleave(2)

    mesa.convert(model)
    loss = _bot_loss(model, x, pids)
    ref_loss = _bot_loss(reference, x, pids)
    assert torch.equal(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    ref_grads = torch.cat([p.grad.flatten() for p in reference.parameters() if p.grad is not None])
    cos = torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0)
    assert cos > 0.99, f"whole-gradient cosine {cos:.4f}"

    model.eval()
    with torch.no_grad():
        features = model(x)
    assert features.shape == (8, 128)  # LITv2 stage-4 width = 8 * embed_dim
