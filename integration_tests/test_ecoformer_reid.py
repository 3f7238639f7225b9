"""EcoFormer attention inside an ev-reid re-id model: convert the backbone, fit the hash, train a
BoT step, extract features, save/load — what a downstream re-id app on both packages does."""

import pytest
import torch

from ev_compress import ecoformer
from ev_reid.losses import batch_hard_triplet_loss, label_smoothed_cross_entropy
from ev_reid.models import ReidModel, ReidModelConfig

BACKBONES = {
    # LITv2: only stage 3 (HiLo) has attention before stage 4
    "litv2_s": {
        "embed_dim": 16,
        "depths": [1, 1, 2, 1],
        "num_heads": [1, 2, 4, 8],
        "drop_path_rate": 0.0,
    },
    "pvt_v2_b0": {"depths": [1, 1, 1, 1], "drop_path_rate": 0.0},
}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_reid_backbone_with_ecoformer_trains_and_extracts(
    backbone: str, restore_rng: None, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    cfg = ReidModelConfig(backbone=backbone, backbone_kwargs=BACKBONES[backbone], num_classes=4)
    model = ReidModel(cfg)
    ecoformer.convert(model, stages=(0, 1, 2), form="sum")
    ecos = ecoformer.eco_attentions(model)
    assert ecos and all(n.startswith("backbone.") for n in ecos)

    x = torch.randn(8, 3, 128, 64)  # re-id aspect ratio 2:1
    pids = torch.arange(4).repeat_interleave(2)
    ecoformer.fit_hash(model, [(x, pids)], iterations=5, generator=torch.Generator().manual_seed(0))
    hash_state = {k: v.clone() for k, v in model.state_dict().items() if ".hash." in k}

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(x)
    triplet, _, _ = batch_hard_triplet_loss(out.features, pids, margin=0.3)
    loss = label_smoothed_cross_entropy(out.logits, pids, epsilon=0.1) + triplet
    assert torch.isfinite(loss)
    loss.backward()
    eco = next(iter(ecos.values()))
    assert eco.qk.weight.grad is not None and eco.qk.weight.grad.abs().sum() > 0  # through the STE
    before = eco.qk.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, eco.qk.weight)
    for k, v in model.state_dict().items():  # training never refits the hash
        if ".hash." in k:
            assert torch.equal(v, hash_state[k]), k

    model.eval()
    with torch.no_grad():
        features = model(x)
    assert features.dim() == 2 and features.shape[0] == 8 and torch.isfinite(features).all()

    path = tmp_path / "reid_eco.pt"
    torch.save(model.state_dict(), path)
    fresh = ecoformer.convert(ReidModel(cfg), form="sum").eval()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh(x), features)
