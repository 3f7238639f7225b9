"""EcoFormer section of ``ev demo`` (called by :func:`ev_compress.demo.run_demo`).

Two measurements a person can look at:

* forward time of one attention layer vs the number of tokens, EcoAttention (O(N·b·d)) against
  ``F.scaled_dot_product_attention`` (O(N²·d)), at sizes that take seconds on a laptop CPU;
* multiplications, additions and energy of one 224² PVTv2-B0 forward (standard, MSA without
  spatial reduction — the paper's baseline —, EcoFormer), counted by
  :func:`ev_compress.energy.count_energy`, beside the paper's EcoFormer figures.

Writes ``ecoformer.json`` (the returned metrics) and ``ecoformer.png`` (both panels; skipped with
a note when matplotlib is missing).
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ev_compress.ecoformer.attention import EcoAttention
from ev_compress.ecoformer.convert import convert, fit_hash
from ev_compress.energy import count_energy
from ev_core.io import write_json

__all__ = ["EcoDemoConfig", "run_demo_section"]

PAPER_B0 = {"mul_B": 0.54, "add_B": 0.56, "energy_BpJ": 2.5}  # EcoFormer paper, PVTv2-B0


@dataclass
class EcoDemoConfig:
    """Settings of the EcoFormer demo section."""

    tokens: list[int] = field(default_factory=lambda: [256, 1024, 2048, 4096])
    dim: int = 64
    heads: int = 1
    repeats: int = 3
    energy_img_size: int = 224
    seed: int = 0


def _time_ms(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def _scaling(cfg: EcoDemoConfig) -> dict[str, list[float]]:
    torch.manual_seed(cfg.seed)
    eco = EcoAttention(cfg.dim, cfg.heads).eval()
    qkv, proj = nn.Linear(cfg.dim, 3 * cfg.dim), nn.Linear(cfg.dim, cfg.dim)

    def sdpa(x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = qkv(x).reshape(B, N, 3, cfg.heads, C // cfg.heads).permute(2, 0, 3, 1, 4)
        return proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))

    eco_ms, sdpa_ms = [], []
    with torch.no_grad():
        for n in cfg.tokens:
            x = torch.randn(1, n, cfg.dim)
            eco.fit(x, iterations=0, generator=torch.Generator().manual_seed(cfg.seed))
            eco_ms.append(_time_ms(lambda x=x: eco(x), cfg.repeats))
            sdpa_ms.append(_time_ms(lambda x=x: sdpa(x), cfg.repeats))
    return {"tokens": list(cfg.tokens), "ecoformer_ms": eco_ms, "sdpa_ms": sdpa_ms}


def _energy(cfg: EcoDemoConfig) -> dict[str, dict[str, float]]:
    import timm

    torch.manual_seed(cfg.seed)
    x = torch.randn(1, 3, cfg.energy_img_size, cfg.energy_img_size)
    eco = convert(timm.create_model("pvt_v2_b0"))
    fit_hash(eco, [x], iterations=0, generator=torch.Generator().manual_seed(cfg.seed))
    models = {
        "standard": timm.create_model("pvt_v2_b0"),
        "MSA, no SR": timm.create_model("pvt_v2_b0", sr_ratios=[1, 1, 1, 1]),
        "EcoFormer": eco,
    }
    out = {}
    for name, model in models.items():
        r = count_energy(model.eval(), x)
        out[name] = {"mul_B": r.mul / 1e9, "add_B": r.add / 1e9, "energy_BpJ": r.picojoules / 1e9}
    return out


def _plot(scaling: dict[str, list[float]], energy: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.loglog(scaling["tokens"], scaling["sdpa_ms"], "o-", label="SDPA (softmax, O(N²))")
    a.loglog(scaling["tokens"], scaling["ecoformer_ms"], "s-", label="EcoAttention (O(N))")
    a.set_xlabel("tokens N")
    a.set_ylabel("forward ms (CPU)")
    a.set_title("one attention layer, C=64")
    a.legend(fontsize=8)
    names = [*energy, "EcoFormer (paper)"]
    values = [energy[n]["energy_BpJ"] for n in energy] + [PAPER_B0["energy_BpJ"]]
    b.bar(range(len(names)), values, color=["#888", "#c55", "#3a7", "#8c8"])
    b.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    b.set_ylabel("energy per image (B pJ)")
    b.set_title("PVTv2-B0, 224², 45 nm fp32")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo_section(out_dir: Path, quick: bool) -> dict[str, Any]:
    """Run the EcoFormer demo section; write ``ecoformer.json`` and ``ecoformer.png``.

    Args:
        out_dir: output folder (created).
        quick: fewer token sizes and one timing repeat (a few seconds).

    Returns:
        The metrics written to ``ecoformer.json``.
    """
    cfg = EcoDemoConfig(tokens=[256, 1024, 2048], repeats=1) if quick else EcoDemoConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    scaling = _scaling(cfg)
    energy = _energy(cfg)
    eco, msa = energy["EcoFormer"], energy["MSA, no SR"]
    crossover = next(
        (
            n
            for n, e, s in zip(
                scaling["tokens"], scaling["ecoformer_ms"], scaling["sdpa_ms"], strict=True
            )
            if e < s
        ),
        None,
    )
    metrics: dict[str, Any] = {
        "config": asdict(cfg),
        "scaling": scaling,
        "crossover_tokens": crossover,
        "energy_pvt_v2_b0": energy,
        "paper_ecoformer_pvt_v2_b0": PAPER_B0,
        "energy_saving_vs_msa": 1 - eco["energy_BpJ"] / msa["energy_BpJ"],
        "files": ["ecoformer.json"],
    }
    if has_mpl:
        _plot(scaling, energy, out_dir / "ecoformer.png")
        metrics["files"].append("ecoformer.png")
    else:
        metrics["figure_skipped"] = (
            "ecoformer.png: matplotlib not installed (pip install ev-compress[plot])"
        )
    write_json(out_dir / "ecoformer.json", metrics)
    return metrics
