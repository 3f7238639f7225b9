"""MCL adaptation (ev-adapt) of an ev-core LITv2 backbone trained under ev-compress's Mesa.

A downstream app would do exactly this to adapt a memory-hungry transformer on one GPU: build
the adaptation model around an ev backbone, convert it with Mesa, and train with the EMA
teacher (which deep-copies the converted model) through ev-core's engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from ev_adapt import AdaptConfig, train_adaptation
from ev_adapt.data import TensorDomainData
from ev_adapt.data.digits import strong_augment, weak_augment
from ev_adapt.models import AdaptNet
from ev_compress import mesa

TINY_LITV2 = {
    "embed_dim": 16,
    "depths": [1, 1, 1, 1],
    "num_heads": [1, 2, 4, 8],
    "drop_path_rate": 0.0,
}


# 32×32 inputs: LITv2's last maps are 2×2 / 1×1, so the last token merging's batch norm sees
# 4 values per channel. Mesa used to quantise that norm's raw input and diverged here
# (layers.2.downsample.dconv.bias gradient 24 → 1.7e5 → 6e15 → 1.8e34 by step 5); it now keeps
# the input normalised per channel and the run stays bounded like fp32 (regression guard).
def _rgb32(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).expand(
        -1, 3, -1, -1
    )


def _scenario() -> TensorDomainData:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(60, 1, 16, 16, generator=g)
    y = torch.arange(60) % 3
    x = x + y.view(-1, 1, 1, 1) * 0.3  # learnable classes
    splits = {
        k: (x[i::5], y[i::5])
        for i, k in enumerate(
            ["source", "labeled_target", "unlabeled_target", "validation", "test"]
        )
    }
    return TensorDomainData(
        splits,
        lambda t, gen: _rgb32(weak_augment(t, gen)),
        lambda t, gen: _rgb32(strong_augment(t, gen)),
        num_classes=3,
    )


def test_mcl_on_mesa_litv2(tmp_path: Path, restore_rng: None) -> None:
    data = _scenario()
    data.splits = {k: (v[0], v[1]) for k, v in data.splits.items()}
    for split in ("validation", "test"):
        x, y = data.splits[split]
        data.splits[split] = (_rgb32(x), y)
    torch.manual_seed(0)
    backbone = timm.create_model("litv2_s", num_classes=0, img_size=32, **TINY_LITV2)
    model = AdaptNet(backbone, num_classes=3, bottleneck_dim=16)
    mesa.convert(model.backbone)
    config = AdaptConfig.preset(
        "digits", method="mcl", steps=6, eval_every=3, device="cpu", source_batch=4,
        target_batch=4, unlabeled_batch=6, ot_start=3, proto_warmup=1,
    )  # fmt: skip
    result = train_adaptation(data, model, config, tmp_path / "run")
    assert [e["step"] for e in result.evaluations] == [3.0, 6.0]
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "loss" in line]
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in logged)
    assert any("loss_ot" in line for line in logged)  # the OT term ran (after step 3)
    report = mesa.summary(model.backbone)
    assert report is not None
    assert (tmp_path / "run" / "ema.safetensors").is_file()
    with pytest.raises(Exception):  # noqa: B017  (the model is converted: stays so)
        mesa.convert(model.backbone)
