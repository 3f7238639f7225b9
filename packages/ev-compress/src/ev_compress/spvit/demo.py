"""SPViT section of ``ev demo``: search a tiny ViT to a FLOPs target on digits, then export it.

A DeiT-style ViT with an average-pooled head (3 blocks, 48 channels, 8×8 patches on 32×32 upsampled digits) is trained
from scratch for a few epochs, converted, searched for a few epochs against 60 % of its FLOPs
(the search also trains the weights), fine-tuned with the found choices fixed, exported, and
checked: the exported model's measured
FLOPs, parameters and test accuracy next to the unpruned model's. Both runs are tiny: the
accuracies show that the pipeline works, not what SPViT reaches on ImageNet. Writes ``spvit_metrics.json``,
``spvit_config.json`` and ``spvit_search.png`` (FLOPs over steps; each block's choice over steps).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ev_compress.spvit.convert import convert, force_choice
from ev_compress.spvit.data import digits_split
from ev_compress.spvit.export import export
from ev_compress.spvit.flops import model_gflops
from ev_compress.spvit.hybrid import BLOCK_CHOICES
from ev_compress.spvit.search import SearchConfig, search
from ev_core.errors import MissingDependencyError
from ev_core.flops import count_flops
from ev_core.io import write_json

__all__ = ["SPViTDemoConfig", "run_demo_section"]


@dataclass
class SPViTDemoConfig:
    """Settings of the SPViT demo section (``quick`` halves depth and epochs)."""

    img_size: int = 32
    patch_size: int = 8
    depth: int = 3
    embed_dim: int = 48
    num_heads: int = 3
    target_fraction: float = 0.6
    train_epochs: int = 3
    train_lr: float = 3e-3
    epochs: int = 2
    finetune_epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-3
    arch_lr: float = 0.02
    theta: float = 0.3
    seed: int = 0


def _accuracy(model: torch.nn.Module, data: Any) -> float:
    x, y = data.tensors
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def _train(model: torch.nn.Module, loader: DataLoader, epochs: int, lr: float, seed: int) -> None:
    """Plain cross-entropy training on ev-core's engine (before the search, and the fine-tune
    with the searched choices fixed after it)."""
    import torch.nn.functional as F

    from ev_core.training import Engine, EngineConfig

    def step(net: torch.nn.Module, batch: Any, eng: Engine) -> dict[str, torch.Tensor]:
        x, y = eng.to_device(batch)
        return {"loss": F.cross_entropy(net(x), y)}

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    engine_cfg = EngineConfig(epochs=epochs, device="cpu", amp="off", seed=seed)
    Engine(model, opt, engine_cfg, name="train").fit(loader, step, resume=False)


def _plot(history: list[dict[str, Any]], target: float, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [h["step"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(steps, [h["gflops"] * 1e3 for h in history], label="model (hard gates)")
    ax1.axhline(target * 1e3, color="k", ls="--", lw=1, label="target")
    ax1.set_xlabel("search step")
    ax1.set_ylabel("MFLOPs (MACs) per image")
    ax1.set_title("FLOPs during the search")
    ax1.legend()
    grid = torch.tensor([[BLOCK_CHOICES.index(c) for c in h["choices"]] for h in history]).T
    cmap = matplotlib.colors.ListedColormap(["#dddddd", "#9ecae1", "#3182bd", "#e6550d"])
    im = ax2.imshow(grid, aspect="auto", cmap=cmap, vmin=-0.5, vmax=3.5, interpolation="nearest")
    ax2.set_xlabel("search step")
    ax2.set_ylabel("block")
    ax2.set_yticks(range(grid.shape[0]))
    ax2.set_title("per-block choice")
    bar = fig.colorbar(im, ax=ax2, ticks=range(4))
    bar.ax.set_yticklabels(list(BLOCK_CHOICES))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_demo_section(out_dir: Path, quick: bool) -> dict[str, Any]:
    """Run the SPViT demo into ``out_dir``; returns its metrics (also in spvit_metrics.json)."""
    import timm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = SPViTDemoConfig()
    if quick:
        cfg.depth, cfg.train_epochs, cfg.epochs, cfg.finetune_epochs = 2, 1, 1, 1
    write_json(out_dir / "spvit_config.json", asdict(cfg))
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    try:
        train, test = digits_split(cfg.img_size, seed=cfg.seed)
    except MissingDependencyError as exc:  # the demo's data needs scikit-learn
        skipped = {"skipped": str(exc)}
        write_json(out_dir / "spvit_metrics.json", skipped)
        print(f"SPViT demo skipped: {exc}")
        return skipped
    kwargs: dict[str, Any] = dict(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        depth=cfg.depth,
        embed_dim=cfg.embed_dim,
        num_heads=cfg.num_heads,
        num_classes=10,
        class_token=False,  # average-pooled head: conv/skip blocks still reach the classifier
        global_pool="avg",
    )
    model = timm.create_model("deit_tiny_patch16_224", **kwargs)
    original_params = sum(p.numel() for p in model.parameters())
    loader = DataLoader(
        train,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    _train(model, loader, cfg.train_epochs, cfg.train_lr, cfg.seed)
    original_acc = _accuracy(model, test)
    convert(model, theta=cfg.theta, model_name="deit_tiny_patch16_224", model_kwargs=kwargs)
    original = float(model_gflops(model, differentiable=False))
    target = cfg.target_fraction * original
    search_cfg = SearchConfig(
        flops_lambda=None,
        lr=cfg.lr,
        arch_lr=cfg.arch_lr,
        schedule="cosine",
        epochs=cfg.epochs,
        device="cpu",
        amp="off",
        seed=cfg.seed,
    )
    result = search(model, loader, target, config=search_cfg, resume=False)
    searched_acc = _accuracy(model, test)
    force_choice(model, "searched", ffn="searched")  # fine-tune the found architecture
    _train(model, loader, cfg.finetune_epochs, cfg.lr, cfg.seed + 1)
    small = export(model)
    size = (3, cfg.img_size, cfg.img_size)
    metrics: dict[str, Any] = {
        "original_gflops": original,
        "target_gflops": target,
        "exported_gflops": result.gflops,
        "exported_gflops_measured": count_flops(small, size).macs / 1e9,
        "original_params": original_params,
        "exported_params": sum(p.numel() for p in small.parameters()),
        "choices": result.choices,
        "ffn_kept": result.ffn_kept,
        "ffn_total": result.ffn_total,
        "steps": result.steps,
        "original_test_accuracy": original_acc,
        "searched_test_accuracy": searched_acc,
        "finetuned_exported_test_accuracy": _accuracy(small, test),
        "note": "trained from scratch and searched for a few epochs on 1,348 digit images: a demo",
    }
    figure = out_dir / "spvit_search.png"
    if _plot(result.history, target, figure):
        metrics["figure"] = str(figure)
    else:
        metrics["figure_skipped"] = "matplotlib is not installed (pip install 'ev-compress[plot]')"
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    path = write_json(out_dir / "spvit_metrics.json", metrics)
    print(f"SPViT demo: metrics {path}" + (f", figure {figure}" if "figure" in metrics else ""))
    return metrics
