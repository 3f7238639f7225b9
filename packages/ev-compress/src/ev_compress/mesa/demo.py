"""Mesa's part of ``ev demo``: a small ViT-S trained on upsampled handwritten digits, with and
without Mesa, under the recipe a DeiT user runs (timm ``ModelEmaV3``, activation checkpointing
in both modes, bf16 autocast), on :class:`ev_core.training.Engine`.

Every run starts from the same weights and sees the same batches (the engine seeds each epoch);
the loss curves of the Mesa runs should track the full-precision one. Writes
``mesa_metrics.json``-style entries into the returned dict, ``mesa_config.json`` (the demo
config and the Mesa policy) and ``mesa_loss.png``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ev_compress import mesa
from ev_core.errors import require
from ev_core.io import write_json
from ev_core.training import Engine, EngineConfig, Hook

__all__ = ["FULL", "QUICK", "MesaDemoConfig", "run_demo_section"]

#: The runs of the demo: name → (Mesa, activation checkpointing, AMP); timm ``ModelEmaV3`` in all.
VARIANTS: dict[str, tuple[bool, str | None, str]] = {
    "full precision": (False, None, "off"),
    "Mesa + checkpointing": (True, "non-reentrant", "off"),
    "Mesa + reentrant checkpointing": (True, "reentrant", "off"),
    "Mesa, bf16 AMP": (True, None, "bf16"),
}


@dataclass
class MesaDemoConfig:
    """Settings of the Mesa demo (the model is ViT-S's architecture at a small size).

    Attributes:
        epochs: passes over the 1,437 training digits.
        batch_size: images per step.
        img_size: digits are upsampled from 8×8 to this size (bilinear).
        patch_size: ViT patch size (``(img_size / patch_size)²`` tokens + the class token).
        embed_dim: ViT width (ViT-S: 384).
        depth: ViT blocks (ViT-S: 12).
        num_heads: attention heads (ViT-S: 6).
        lr: AdamW learning rate.
        ema_decay: decay of timm's ``ModelEmaV3`` (with its warm-up).
        seed: seed of the weights and the batch order.
    """

    epochs: int = 1
    batch_size: int = 64
    img_size: int = 32
    patch_size: int = 8
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    lr: float = 1e-3
    ema_decay: float = 0.99
    seed: int = 0


#: ``quick`` (a smoke run, seconds): 1 epoch of a 2-block width-48 model.
QUICK = MesaDemoConfig(epochs=1, batch_size=128, embed_dim=48, depth=2, lr=5e-3)
#: ``--full``: the issue's 2-epoch run, of a 6-block width-192 model (batch 32, lr 3e-4: it
#: reaches ~60 % test accuracy; a few minutes).
FULL = MesaDemoConfig(epochs=2, batch_size=32, embed_dim=192, depth=6, num_heads=3, lr=3e-4)


def _digits(img_size: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """sklearn's 1,797 handwritten digits, upsampled, normalised, split 80/20."""
    datasets: Any = require("sklearn.datasets", "demo", "ev-compress", "the Mesa demo's digits")
    bunch = datasets.load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    tr, te = order[:split], order[split:]
    return x[tr], y[tr], x[te], y[te]


def _model(cfg: MesaDemoConfig) -> nn.Module:
    import timm

    torch.manual_seed(cfg.seed)
    return timm.create_model(
        "vit_small_patch16_224",
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        num_classes=10,
    )


class _Recorder(Hook):
    """timm ``ModelEmaV3`` updated after each optimizer step; per-step losses."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.ema: Any = None
        self.losses: list[float] = []

    def on_fit_start(self, engine: Engine) -> None:
        from timm.utils import ModelEmaV3

        # deep-copies the converted model (hooks, estimates and all)
        self.ema = ModelEmaV3(engine.raw_model, decay=self.decay, use_warmup=True)

    def on_step_end(self, engine: Engine, logs: Mapping[str, float]) -> None:
        self.losses.append(float(logs["loss"]))
        self.ema.update(engine.raw_model, step=engine.state.step)


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def _run(
    name: str, cfg: MesaDemoConfig, data: tuple[Tensor, Tensor, Tensor, Tensor]
) -> dict[str, Any]:
    import timm.layers

    use_mesa, ckpt, amp = VARIANTS[name]
    xtr, ytr, xte, yte = data
    model = _model(cfg)
    if use_mesa:
        mesa.convert(model)
    if ckpt is not None:
        model.set_grad_checkpointing(True)  # type: ignore[operator]  # timm models have it
    loader = DataLoader(
        TensorDataset(xtr, ytr),
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=torch.Generator(),  # seeded by the engine every epoch
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    recorder = _Recorder(cfg.ema_decay)
    engine = Engine(
        model,
        optimizer,
        EngineConfig(epochs=cfg.epochs, device="cpu", amp=amp, seed=cfg.seed, eval_every=0),
        hooks=[recorder],
        name=name,
    )

    def step_fn(m: nn.Module, batch: Any, eng: Engine) -> dict[str, Tensor]:
        x, y = eng.to_device(batch)
        return {"loss": F.cross_entropy(m(x).float(), y)}

    reentrant_before = timm.layers.use_reentrant_ckpt()
    timm.layers.set_reentrant_ckpt(ckpt == "reentrant")
    start = time.perf_counter()
    try:
        engine.fit(loader, step_fn, resume=False)
    finally:
        timm.layers.set_reentrant_ckpt(reentrant_before)
    seconds = time.perf_counter() - start
    return {
        "loss": recorder.losses,
        "test_accuracy": _accuracy(model, xte, yte),
        "test_accuracy_ema": _accuracy(recorder.ema.module, xte, yte),
        "seconds": seconds,
        "mesa_estimates": len(mesa.running_estimates(model)) if use_mesa else 0,
    }


def _saved_bytes(cfg: MesaDemoConfig, x: Tensor) -> dict[str, int]:
    """Saved-for-backward activation bytes of one training forward (fp32 and bf16)."""
    out: dict[str, int] = {}
    for amp in (False, True):
        for use_mesa in (False, True):
            model = _model(cfg)
            if use_mesa:
                mesa.convert(model)
            with (
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp),
                mesa.SavedTensorMeter(model.parameters(), activations_only=True) as meter,
            ):
                model(x)
            out[f"{'mesa' if use_mesa else 'baseline'}_{'bf16' if amp else 'fp32'}"] = (
                meter.total_bytes
            )
    return out


def _plot(curves: dict[str, list[float]], path: Path, cfg: MesaDemoConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, losses in curves.items():
        style = "-" if label.startswith("full") else "--"
        ax.plot(range(1, len(losses) + 1), losses, style, label=label, linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(
        f"ViT-S architecture (width {cfg.embed_dim}, depth {cfg.depth}) on upsampled digits:\n"
        "full precision vs Mesa 8-bit activations",
        fontsize=9,
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo_section(
    out_dir: Path, quick: bool, config: MesaDemoConfig | None = None, full: bool = False
) -> dict[str, Any]:
    """Run the Mesa demo; write ``mesa_config.json`` and ``mesa_loss.png`` into ``out_dir``.

    Args:
        out_dir: output folder (created).
        quick: a smoke run (:data:`QUICK`: 1 epoch, width 48, depth 2).
        config: explicit settings (overrides ``quick`` and ``full``).
        full: the long run (:data:`FULL`: 2 epochs, width 192, depth 6, 32×32). Neither:
            :class:`MesaDemoConfig` (1 epoch, width 96, depth 4, 32×32; ~15 s of CPU).

    Returns:
        Metrics: per-run loss curves, test accuracy (model and EMA), seconds, saved bytes.
    """
    cfg = config if config is not None else FULL if full else QUICK if quick else MesaDemoConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib  # noqa: F401

        plot = True
    except ImportError:
        plot = False
    data = _digits(cfg.img_size, cfg.seed)
    write_json(
        out_dir / "mesa_config.json",
        {"demo": dataclasses.asdict(cfg), "policy": mesa.MesaPolicy().to_dict()},
    )
    runs = {name: _run(name, cfg, data) for name in VARIANTS}
    saved = _saved_bytes(cfg, data[0][: cfg.batch_size])
    base = runs["full precision"]["loss"]
    metrics: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "runs": runs,
        "saved_bytes": saved,
        "saved_ratio_fp32": saved["mesa_fp32"] / saved["baseline_fp32"],
        "saved_ratio_bf16": saved["mesa_bf16"] / saved["baseline_bf16"],
        # mean |loss − baseline loss| over the last epoch, relative to the baseline
        "last_epoch_gap": {name: _gap(run["loss"], base, cfg.epochs) for name, run in runs.items()},
        "figures": [],
    }
    if plot:
        path = out_dir / "mesa_loss.png"
        _plot({n: r["loss"] for n, r in runs.items()}, path, cfg)
        metrics["figures"].append(str(path))
    else:
        metrics["skipped_figures"] = ["mesa_loss.png (matplotlib is not installed)"]
    json.dumps(metrics)  # JSON-able
    return metrics


def _gap(losses: list[float], base: list[float], epochs: int) -> float:
    n = len(base) // epochs
    a, b = torch.tensor(losses[-n:]), torch.tensor(base[-n:])
    return float((a - b).abs().mean() / b.mean())
