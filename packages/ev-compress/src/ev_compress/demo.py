"""``ev demo`` for ev-compress: Mesa vs full-precision training of a tiny ViT on generated data.

Both runs start from the same weights and see the same batches; the demo writes
``metrics.json`` (loss curves, saved-for-backward bytes of both, Mesa's summary counts),
``config.json`` and ``mesa_loss.png`` (the two loss curves).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ev_compress import mesa
from ev_core.io import write_json
from ev_core.progress import progress
from ev_core.repro import dump_run_config, seed_everything

__all__ = ["DemoConfig", "run_demo"]


@dataclass
class DemoConfig:
    """Settings of the Mesa demo."""

    steps: int = 60
    batch_size: int = 32
    img_size: int = 32
    depth: int = 4
    lr: float = 1e-3
    seed: int = 0


def _data(cfg: DemoConfig) -> tuple[Tensor, Tensor]:
    """Images whose 4 classes are set by the sign of the mean of two colour/half regions."""
    g = torch.Generator().manual_seed(cfg.seed)
    n = cfg.batch_size * 8
    x = torch.randn(n, 3, cfg.img_size, cfg.img_size, generator=g)
    half = cfg.img_size // 2
    y = (x[:, 0, :half].mean(dim=(1, 2)) > 0).long() + 2 * (
        x[:, 1, half:].mean(dim=(1, 2)) > 0
    ).long()
    return x, y


def _train(model: nn.Module, x: Tensor, y: Tensor, cfg: DemoConfig, desc: str) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses = []
    batches = x.shape[0] // cfg.batch_size
    for step in progress(range(cfg.steps), desc=desc):
        sl = slice((step % batches) * cfg.batch_size, (step % batches + 1) * cfg.batch_size)
        loss = F.cross_entropy(model(x[sl]), y[sl])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _plot(curves: dict[str, list[float]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("the loss plot needs matplotlib: pip install ev-compress[plot]") from exc
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, losses in curves.items():
        ax.plot(range(1, len(losses) + 1), losses, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("tiny ViT: full precision vs Mesa (8-bit activations)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(out_dir: Path, quick: bool) -> dict[str, Any]:
    """Train a tiny ViT with and without Mesa; write metrics, config and the loss plot.

    Args:
        out_dir: output folder (created).
        quick: a few steps on a smaller model (seconds).

    Returns:
        The metrics written to ``metrics.json``.
    """
    import timm

    cfg = DemoConfig(steps=12, batch_size=16, depth=2) if quick else DemoConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_run_config({"demo": cfg, "policy": mesa.MesaPolicy().to_dict()}, out_dir)
    seed_everything(cfg.seed)
    base = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=cfg.img_size,
        patch_size=8,
        depth=cfg.depth,
        num_classes=4,
    )
    converted = mesa.convert(copy.deepcopy(base))
    x, y = _data(cfg)
    probe = x[: cfg.batch_size]
    params = list(base.parameters())
    with mesa.SavedTensorMeter(params) as meter_base:
        base(probe)
    with mesa.SavedTensorMeter(converted.parameters()) as meter_mesa:
        converted(probe)
    curves = {
        "full precision": _train(base, x, y, cfg, "baseline"),
        "Mesa 8-bit": _train(converted, x, y, cfg, "mesa"),
    }
    metrics: dict[str, Any] = {
        "saved_bytes_baseline": meter_base.total_bytes,
        "saved_bytes_mesa": meter_mesa.total_bytes,
        "saved_ratio": meter_mesa.total_bytes / meter_base.total_bytes,
        "loss_baseline": curves["full precision"],
        "loss_mesa": curves["Mesa 8-bit"],
        "final_loss_gap": abs(curves["Mesa 8-bit"][-1] - curves["full precision"][-1]),
        "compressed_calls": mesa.summary(converted).counts(),
    }
    write_json(out_dir / "metrics.json", metrics)
    _plot(curves, out_dir / "mesa_loss.png")
    return metrics
