"""``ev demo`` for ev-core: the LIT / LITv2 model zoo next to the papers, plus a CPU speed check.

The demo

* builds every registered LIT / LITv2 model **on the meta device** (no memory, no
  initialisation) and counts its parameters and MACs at 224² with
  :func:`ev_core.flops.count_flops`, next to the exact parameter counts of the official code
  and the papers' figures (params in M, "GFLOPs" = GMACs, ImageNet-1K top-1);
* times eager fp32 inference on the CPU of ``litv2_s`` and ``lit_s`` against timm's
  ``swin_tiny_patch4_window7_224`` (the baseline) with :class:`ev_core.benchmark.BenchmarkSuite`
  -- the real models at 224² by default, a reduced width/depth at 64² with ``quick``;
* writes ``models.json`` (everything above, the dictionary it returns), ``config.json`` (the
  resolved :class:`DemoConfig` and the environment) and ``models.png`` (GMACs vs parameters,
  ev count against the papers, and the throughput bars). The figure needs matplotlib
  (``pip install ev-core[plot]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ev_core.benchmark import BenchmarkSuite
from ev_core.io import write_json
from ev_core.progress import progress
from ev_core.repro import dump_run_config, seed_everything

__all__ = ["PAPER", "DemoConfig", "run_demo"]

#: Published figures (SYSTEMS.md §7.1) and the exact parameter counts of the official code with
#: the 1000-class head (§1.2, §1.3). The papers' "GFLOPs" are MACs.
PAPER: dict[str, dict[str, float | int]] = {
    "lit_ti": {"official_params": 19_886_272, "params_m": 19, "gflops": 3.6, "top1": 81.1},
    "lit_s": {"official_params": 27_973_720, "params_m": 27, "gflops": 4.1, "top1": 81.5},
    "lit_m": {"official_params": 49_372_264, "params_m": 48, "gflops": 8.6, "top1": 83.0},
    "lit_b": {"official_params": 87_292_384, "params_m": 86, "gflops": 15.0, "top1": 83.4},
    "litv2_s": {"official_params": 27_844_000, "params_m": 28, "gflops": 3.7, "top1": 82.0},
    "litv2_m": {"official_params": 48_830_368, "params_m": 49, "gflops": 7.5, "top1": 83.3},
    "litv2_b": {"official_params": 86_520_704, "params_m": 87, "gflops": 13.2, "top1": 83.6},
}

BASELINE = "swin_tiny_patch4_window7_224"


def _full_size() -> dict[str, dict[str, Any]]:
    return {BASELINE: {}, "litv2_s": {}, "lit_s": {}}


def _reduced() -> dict[str, dict[str, Any]]:
    """Same families at a quarter of the width, 5 blocks and 10 classes (for ``quick``)."""
    small: dict[str, Any] = dict(
        embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), num_classes=10
    )
    return {
        BASELINE: {**small, "img_size": 64, "window_size": 4},
        "litv2_s": dict(small),
        "lit_s": {**small, "img_size": 64},
    }


@dataclass
class DemoConfig:
    """Settings of the ev-core demo.

    Attributes:
        flops_img_size: resolution of the parameter / MAC table (the papers' 224²).
        speed_img_size: input resolution of the throughput comparison.
        batch_size: images per timed forward.
        min_run_time: seconds of timed runs per model.
        warmup: untimed forwards per model.
        speed_models: timm model name → constructor overrides for the throughput comparison
            (the first is the baseline).
        threads: CPU threads while timing (``None``: torch's default). ``quick`` uses 1: tiny
            models on a busy machine lose most of their time in OpenMP barriers otherwise.
        seed: seed of weights and inputs.
    """

    flops_img_size: int = 224
    speed_img_size: int = 224
    batch_size: int = 8
    min_run_time: float = 1.0
    warmup: int = 1
    speed_models: dict[str, dict[str, Any]] = field(default_factory=_full_size)
    threads: int | None = None
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoConfig:
        """A few seconds on 2 CPU cores: reduced models at 64², batch 4, one thread."""
        return cls(
            speed_img_size=64,
            batch_size=4,
            min_run_time=0.2,
            warmup=1,
            speed_models=_reduced(),
            threads=1,
        )


def _zoo_table(img_size: int) -> dict[str, dict[str, Any]]:
    """Parameters and MACs of every LIT / LITv2 model, built on the meta device."""
    import timm

    from ev_core.flops import count_flops

    rows: dict[str, dict[str, Any]] = {}
    for name in progress(list(PAPER), desc="params/MACs"):
        with torch.device("meta"):
            model = timm.create_model(name)
        params = sum(p.numel() for p in model.parameters())
        gmacs = count_flops(model, (3, img_size, img_size)).gmacs
        paper = PAPER[name]
        rows[name] = {
            "params": params,
            "official_params": paper["official_params"],
            "params_equal_official": params == paper["official_params"],
            "gmacs": round(gmacs, 4),
            "paper_gflops": paper["gflops"],
            "paper_params_m": paper["params_m"],
            "paper_top1": paper["top1"],
        }
    return rows


def _throughput(cfg: DemoConfig) -> dict[str, dict[str, Any]]:
    """Eager fp32 CPU inference of ``cfg.speed_models`` (images/s, ratio vs the baseline)."""
    import timm

    suite = BenchmarkSuite("ev-core demo", min_run_time=cfg.min_run_time, warmup=cfg.warmup)
    size = cfg.speed_img_size
    baseline = next(iter(cfg.speed_models))
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        for name, overrides in progress(list(cfg.speed_models.items()), desc="CPU throughput"):
            model: nn.Module = timm.create_model(name, **overrides).eval()
            model = model.to(memory_format=torch.channels_last)
            x = torch.randn(cfg.batch_size, 3, size, size).contiguous(
                memory_format=torch.channels_last
            )

            def run(model: nn.Module = model, x: torch.Tensor = x) -> torch.Tensor:
                with torch.no_grad():
                    return model(x)

            suite.add(name, run, group="cpu fp32 eager", baseline=name == baseline,
                      items_per_call=cfg.batch_size)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    out: dict[str, dict[str, Any]] = {}
    for row in suite.rows:
        assert row.throughput is not None and row.ratio_vs_baseline is not None
        out[row.name] = {
            "img_per_s": round(row.throughput, 3),
            "median_ms": round(row.median_ms, 3),
            "iqr_ms": round(row.iqr_ms, 3),
            "runs": row.runs,
            "speed_vs_baseline": round(row.ratio_vs_baseline, 3),
        }
    return out


def _plot(metrics: dict[str, Any], path: Path) -> None:
    """GMACs vs parameters (ev count vs papers) and the throughput bars, as one PNG."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "the ev-core demo figure needs matplotlib: pip install ev-core[plot]"
        ) from exc
    fig = Figure(figsize=(11, 4.2))
    ax_zoo, ax_speed = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    for family, color, dy in (("litv2", "tab:blue", -12), ("lit", "tab:orange", 5)):
        names = [n for n in metrics["models"] if n.split("_")[0] == family]
        rows = [metrics["models"][n] for n in names]
        ax_zoo.scatter([r["params"] / 1e6 for r in rows], [r["gmacs"] for r in rows],
                       color=color, label=f"{family.upper()} (ev count)", zorder=3)  # fmt: skip
        ax_zoo.scatter([r["official_params"] / 1e6 for r in rows], [r["paper_gflops"] for r in rows],
                       facecolors="none", edgecolors="black", s=110, linewidths=1,
                       label="_paper" if family == "lit" else "paper (exact params, GFLOPs)")  # fmt: skip
        for n, r in zip(names, rows, strict=True):
            ax_zoo.annotate(f"{n} ({r['paper_top1']}%)", (r["params"] / 1e6, r["gmacs"]),
                            textcoords="offset points", xytext=(7, dy), fontsize=8)  # fmt: skip
    ax_zoo.set_xlabel("parameters (M)")
    ax_zoo.set_ylabel(f"GMACs at {metrics['flops_img_size']}²")
    ax_zoo.set_title("LIT / LITv2: ev count vs paper (label: paper top-1)")
    ax_zoo.grid(alpha=0.3)
    ax_zoo.margins(x=0.12, y=0.1)
    ax_zoo.legend(loc="upper left", fontsize=8)
    speed = metrics["throughput"]
    names = list(speed)
    values = [speed[n]["img_per_s"] for n in names]
    bars = ax_speed.bar(
        range(len(names)), values, color=["grey", "tab:blue", "tab:orange"][: len(names)]
    )
    ax_speed.bar_label(bars, labels=[f"{speed[n]['speed_vs_baseline']:.2f}×" for n in names])
    ax_speed.set_xticks(range(len(names)), [n.split("_patch")[0] for n in names])
    ax_speed.set_ylabel("images / s")
    info = metrics["throughput_setup"]
    ax_speed.set_title(f"CPU fp32 eager, batch {info['batch_size']}, {info['img_size']}²"
                       + (" (reduced models)" if info["quick"] else ""), fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_demo(out_dir: Path, quick: bool) -> dict[str, Any]:
    """Count, compare and time the LIT / LITv2 models; write JSON metrics and a PNG figure.

    Args:
        out_dir: output folder (created).
        quick: reduced models at 64² for the throughput part (seconds on 2 CPU cores); the
            parameter / MAC table is always the full models at 224².

    Returns:
        The metrics written to ``models.json``: ``models`` (per model: ``params``,
        ``official_params``, ``gmacs``, the papers' figures), ``throughput`` (per timed model:
        images/s, median/IQR ms, speed vs the Swin-T baseline) and the setup.

    Raises:
        ImportError: naming the ``plot`` extra when matplotlib is missing.
    """
    cfg = DemoConfig.quick() if quick else DemoConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_run_config(cfg, out_dir)
    seed_everything(cfg.seed)
    import ev_core.models  # noqa: F401  (registers the LIT / LITv2 models with timm)

    metrics: dict[str, Any] = {
        "flops_img_size": cfg.flops_img_size,
        "models": _zoo_table(cfg.flops_img_size),
        "throughput_setup": {
            "device": "cpu",
            "dtype": "fp32",
            "mode": "eager",
            "batch_size": cfg.batch_size,
            "img_size": cfg.speed_img_size,
            "threads": cfg.threads or torch.get_num_threads(),
            "quick": quick,
            "baseline": next(iter(cfg.speed_models)),
            "models": {k: dict(v) for k, v in cfg.speed_models.items()},
        },
        "throughput": _throughput(cfg),
    }
    metrics["max_gmacs_gap_vs_paper"] = round(
        max(abs(r["gmacs"] - r["paper_gflops"]) for r in metrics["models"].values()), 4
    )
    metrics["all_params_equal_official"] = all(
        r["params_equal_official"] for r in metrics["models"].values()
    )
    write_json(out_dir / "models.json", metrics)
    _plot(metrics, out_dir / "models.png")
    return metrics
