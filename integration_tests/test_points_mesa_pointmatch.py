"""PointMatch training steps of an ev-points point U-Net with ev-compress's Mesa (8-bit saved
activations), run on ev-core's training Engine with its EMA teacher."""

import numpy as np
import torch
from torch.utils.data import DataLoader

from ev_compress import mesa
from ev_core.training import Engine, EngineConfig
from ev_points.data import SyntheticSceneConfig, make_synthetic_scenes
from ev_points.models import PointUNet, PointUNetConfig
from ev_points.pointmatch import PointMatchConfig, WeakLabelDataset, make_step_fn, weak_label_mask


def test_point_unet_step_under_mesa_matches_fp32(restore_rng: None) -> None:
    torch.manual_seed(0)
    cfg = PointUNetConfig.tiny(7)
    model, reference = PointUNet(cfg), PointUNet(cfg)
    reference.load_state_dict(model.state_dict())
    mesa.convert(model)
    xyz, rgb = torch.rand(2, 256, 3) * 4, torch.rand(2, 256, 3)
    target = torch.randint(0, 7, (2, 256))
    pyr = model.pyramid(xyz)
    loss = torch.nn.functional.cross_entropy(model(xyz, rgb, pyr).flatten(0, 1), target.flatten())
    ref = torch.nn.functional.cross_entropy(
        reference(xyz, rgb, pyr).flatten(0, 1), target.flatten()
    )
    assert torch.equal(loss, ref)  # Mesa's forward is exact
    loss.backward()
    ref.backward()
    g = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    r = torch.cat([p.grad.flatten() for p in reference.parameters()]).double()
    cos = torch.nn.functional.cosine_similarity(g, r, dim=0)
    assert cos > 0.99, f"whole-gradient cosine {cos:.4f}"


def test_pointmatch_engine_run_with_mesa_and_ema(tmp_path, restore_rng: None) -> None:
    scenes = make_synthetic_scenes(2, 0, SyntheticSceneConfig(num_points=600))
    masks = [weak_label_mask(s, ratio=0.01) for s in scenes]
    cfg = PointMatchConfig(
        num_points=256, batch_size=2, steps=3, threshold=0.0, model=PointUNetConfig.tiny(7)
    )
    torch.manual_seed(0)
    model = mesa.convert(PointUNet(cfg.model))
    # Mesa adds its running-range entries to state_dict at the first training forward; ev-core's
    # ModelEma copies the model at Engine construction and then looks every entry up, so the
    # estimates must exist before the copy (without this forward: KeyError 'stem.0.mesa_...').
    xyz, rgb = torch.rand(1, 256, 3), torch.rand(1, 256, 3)
    model(xyz, rgb).sum().backward()
    model.zero_grad()
    engine = Engine(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        EngineConfig(
            max_steps=3, device="cpu", amp="off", ema_decay=0.9, log_every=1, eval_every=0
        ),
        out_dir=tmp_path / "run",
    )
    loader = DataLoader(
        WeakLabelDataset(scenes, masks, 256, 6),
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
    )
    result = engine.fit(loader, make_step_fn(cfg))
    assert result.state.step == 3
    logs = [h for h in result.history if "loss_pseudo" in h]
    assert logs and all(np.isfinite(h["loss"]) for h in logs)
    assert all(h["pseudo_ratio"] == 1.0 for h in logs)  # threshold 0: every point gets a target
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
    assert mesa.is_converted(engine.raw_model)
    teacher = engine.ema.module
    assert not any(
        torch.equal(a, b)
        for a, b in zip(teacher.parameters(), model.parameters(), strict=True)
        if a.numel() > 8
    )
