"""EcoFormer benchmarks: attention scaling vs SDPA, whole-model throughput, energy table.

Sections (``--sections``, default all):

* ``attention`` — one attention layer's forward (no grad) from 1k to 64k tokens: EcoAttention
  (qk/v/out projections + hash + O(N·b·d) attention) against the MSA a user would otherwise run
  (qkv projection + ``F.scaled_dot_product_attention`` + out projection), same width/heads.
  Time (median) and peak memory per size (peak-RSS growth of one forward in a fresh process;
  PyTorch's CPU SDPA is a tiled flash kernel, so it does not hold the N×N map); SDPA sizes whose predicted time (4× the previous size)
  exceeds ``--sdpa-max-seconds`` are skipped and recorded as such. Linear-growth check:
  EcoAttention time at 16k ≤ 5× its time at 4k. The crossover is the first size where
  EcoAttention is faster.
* ``models`` — PVTv2-B0/B2 throughput (img/s, batch ``--batch``, 224², eval, no grad),
  standard timm model vs the same model after ``ecoformer.convert`` (stages 1–3), calls
  alternating so both see the same load (medians of ``--repeats``).
* ``energy`` — ``ev_compress.energy.count_energy`` per 224² image for PVTv2-B0…B2 and LITv2-S:
  standard, MSA without spatial reduction (the paper's baseline), EcoFormer; beside the
  paper's numbers (EcoFormer Table, SYSTEMS.md §7.2).

Hashes are fitted with ``iterations=0`` (random projection, fitted anchors/mean) for timing and
counting: the cost of a forward does not depend on the learnt projection.

    python packages/ev-compress/benchmarks/bench_ecoformer.py --quick
    python packages/ev-compress/benchmarks/bench_ecoformer.py --threads 1 --out ecoformer_cpu
    python packages/ev-compress/benchmarks/bench_ecoformer.py --device cuda --sections attention \
        models --sdpa-max-seconds 5 --batch 64 --out ecoformer_gpu
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

import ev_core  # noqa: F401  (registers litv2_s with timm)
from ev_compress import ecoformer
from ev_compress.energy import count_energy
from ev_core.benchmark import BenchmarkSuite
from ev_core.io import write_json
from ev_core.repro import environment_info

# EcoFormer paper (NeurIPS'22) energy table: billions of mul / add, energy in B pJ (§7.2)
PAPER = {
    "pvt_v2_b0": (0.54, 0.56, 2.5),
    "pvt_v2_b1": (2.03, 2.09, 9.4),
    "pvt_v2_b2": (3.85, 3.97, 17.8),
}


class SdpaAttention(nn.Module):
    """The baseline: global MSA with fused SDPA (timm/PVTv2 without spatial reduction)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


_PEAK_SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
from bench_ecoformer import EcoWrapper, SdpaAttention
from ev_core.benchmark import measure_peak_memory
torch.set_num_threads(1)
torch.manual_seed(0)
impl, n, dim, heads, device = {impl!r}, {n}, {dim}, {heads}, {device!r}
x = torch.randn(1, n, dim, device=device)
if impl == "ecoformer":
    m = EcoWrapper(dim, heads).to(device).eval()
    m.attn.fit(x[:, :4096], iterations=0, generator=torch.Generator().manual_seed(0))
else:
    m = SdpaAttention(dim, heads).to(device).eval()
with torch.no_grad():
    print(measure_peak_memory(lambda: m(x), device))
"""


def _fresh_peak_mib(impl: str, n: int, dim: int, heads: int, device: str) -> float:
    """Peak memory of one forward in a fresh process whose allocator holds nothing from earlier
    forwards (what a user's process feels): RSS above the RSS before the call, sampled every
    0.5 ms, on the CPU; ``max_memory_allocated`` above the allocated memory on CUDA (MiB)."""
    code = _PEAK_SCRIPT.format(
        here=str(Path(__file__).parent), impl=impl, n=n, dim=dim, heads=heads, device=device
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def _fit_random(model: nn.Module, x: torch.Tensor) -> None:
    ecoformer.fit_hash(model, [x[:1]], iterations=0, generator=torch.Generator().manual_seed(0))


def bench_attention(args: argparse.Namespace) -> dict[str, Any]:
    suite = BenchmarkSuite(
        "ecoformer_attention", device=args.device, min_run_time=args.min_run_time, warmup=1
    )
    torch.manual_seed(0)
    eco = EcoWrapper(args.dim, args.heads).to(args.device).eval()
    sdpa = SdpaAttention(args.dim, args.heads).to(args.device).eval()
    eco_ms: dict[int, float] = {}
    sdpa_ms: dict[int, float] = {}
    skipped: list[int] = []
    last_sdpa = None
    for n in args.tokens:
        x = torch.randn(1, n, args.dim, device=args.device)
        eco.attn.fit(x[:, : min(n, 4096)], iterations=0, generator=torch.Generator().manual_seed(0))
        group = f"N={n}"
        with torch.no_grad():
            predicted = None if last_sdpa is None else last_sdpa * 4 / 1e3
            if predicted is not None and predicted > args.sdpa_max_seconds:
                suite.add_failure(
                    "sdpa",
                    group,
                    f"skipped: predicted {predicted:.0f} s per call > "
                    f"--sdpa-max-seconds {args.sdpa_max_seconds:g}",
                    tokens=n,
                )
                skipped.append(n)
            else:
                row = suite.add(
                    "sdpa",
                    lambda x=x: sdpa(x),
                    group=group,
                    baseline=True,
                    tokens=n,
                    fresh_peak_rss_mib=_fresh_peak_mib(
                        "sdpa", n, args.dim, args.heads, args.device
                    ),
                )
                sdpa_ms[n] = last_sdpa = row.median_ms
            row = suite.add(
                "ecoformer",
                lambda x=x: eco(x),
                group=group,
                tokens=n,
                fresh_peak_rss_mib=_fresh_peak_mib(
                    "ecoformer", n, args.dim, args.heads, args.device
                ),
            )
            eco_ms[n] = row.median_ms
        peaks = {r.name: r.extra.get("fresh_peak_rss_mib") for r in suite.rows if r.group == group}
        print(
            f"N={n}: ecoformer {eco_ms[n]:.1f} ms, sdpa {sdpa_ms.get(n, float('nan')):.1f} ms; "
            f"fresh-process peak RSS growth MiB {peaks}",
            flush=True,
        )
    suite.print_table()
    crossover = next((n for n in args.tokens if n in sdpa_ms and eco_ms[n] < sdpa_ms[n]), None)
    ratio = eco_ms[16384] / eco_ms[4096] if 16384 in eco_ms and 4096 in eco_ms else None
    sdpa_ratio = sdpa_ms[16384] / sdpa_ms[4096] if 16384 in sdpa_ms and 4096 in sdpa_ms else None
    suite.notes.update(
        dim=args.dim,
        heads=args.heads,
        bits=16,
        anchors=25,
        crossover_tokens=crossover,
        eco_time_16k_over_4k=ratio,
        sdpa_time_16k_over_4k=sdpa_ratio,
        sdpa_skipped=skipped,
        linear_growth_ok=None if ratio is None else ratio <= 5.0,
    )
    print(
        f"\ncrossover: {crossover} tokens; EcoFormer 16k/4k time = {ratio}; SDPA 16k/4k = {sdpa_ratio}"
    )
    suite.write_json(args.out / "ecoformer_attention.json")
    return suite.to_dict()


class EcoWrapper(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = ecoformer.EcoAttention(dim, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)


def bench_models(args: argparse.Namespace) -> dict[str, Any]:
    """Whole-model throughput; standard and EcoFormer calls alternate (``--repeats`` pairs) so
    both see the same machine load, and the medians are compared."""
    import time

    x = torch.randn(args.batch, 3, 224, 224, device=args.device)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        base = timm.create_model(name).to(args.device).eval()
        eco = timm.create_model(name).to(args.device).eval()
        eco.load_state_dict(base.state_dict())
        ecoformer.convert(eco)
        _fit_random(eco, x)
        times: dict[str, list[float]] = {"standard": [], "ecoformer": []}
        with torch.no_grad():
            base(x), eco(x)  # warm-up
            for _ in range(args.repeats):
                for label, model in (("standard", base), ("ecoformer", eco)):
                    sync()
                    start = time.perf_counter()
                    model(x)
                    sync()
                    times[label].append(time.perf_counter() - start)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        row = {
            "model": name,
            "batch": args.batch,
            "repeats": args.repeats,
            "standard_img_s": args.batch / med["standard"],
            "ecoformer_img_s": args.batch / med["ecoformer"],
            "ecoformer_speed_vs_standard": med["standard"] / med["ecoformer"],
            "times_s": times,
        }
        rows.append(row)
        print(
            f"{name}: standard {row['standard_img_s']:.2f} img/s, EcoFormer {row['ecoformer_img_s']:.2f} img/s "
            f"({row['ecoformer_speed_vs_standard']:.2f}x)",
            flush=True,
        )
    result = {"rows": rows, "metadata": environment_info()}
    write_json(args.out / "ecoformer_models.json", result)
    return result


def _energy_row(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    r = count_energy(model.eval(), x)
    return {
        "mul_B": r.mul / 1e9,
        "add_B": r.add / 1e9,
        "energy_BpJ": r.picojoules / 1e9,
        "uncounted": r.uncounted,
    }  # type: ignore[dict-item]


def bench_energy(args: argparse.Namespace) -> dict[str, Any]:
    x = torch.randn(1, 3, 224, 224)
    rows: list[dict[str, Any]] = []
    for name in args.energy_models:
        torch.manual_seed(0)
        variants: dict[str, nn.Module] = {"standard": timm.create_model(name)}
        if name.startswith("pvt_v2"):
            variants["MSA, no SR"] = timm.create_model(name, sr_ratios=[1, 1, 1, 1])
        eco = ecoformer.convert(timm.create_model(name))
        _fit_random(eco, x)
        variants["EcoFormer"] = eco
        for variant, model in variants.items():
            row = {"model": name, "variant": variant, **_energy_row(model, x)}
            if variant == "EcoFormer" and name in PAPER:
                pm, pa, pe = PAPER[name]
                row.update(
                    paper_mul_B=pm,
                    paper_add_B=pa,
                    paper_energy_BpJ=pe,
                    mul_rel_diff=row["mul_B"] / pm - 1,
                    add_rel_diff=row["add_B"] / pa - 1,
                )
            rows.append(row)
            print(row, flush=True)
    lines = [
        "| model | variant | mul (B) | add (B) | energy (B pJ) | paper mul / add / energy | Δ mul / Δ add |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        paper = (
            f"{r['paper_mul_B']} / {r['paper_add_B']} / {r['paper_energy_BpJ']}"
            if "paper_mul_B" in r
            else "–"
        )
        diff = (
            f"{r['mul_rel_diff']:+.1%} / {r['add_rel_diff']:+.1%}" if "mul_rel_diff" in r else "–"
        )
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['mul_B']:.3f} | {r['add_B']:.3f} | "
            f"{r['energy_BpJ']:.2f} | {paper} | {diff} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    result = {"rows": rows, "table": table, "metadata": environment_info()}
    write_json(args.out / "ecoformer_energy.json", result)
    return result


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--sections",
        nargs="+",
        default=["attention", "models", "energy"],
        choices=["attention", "models", "energy"],
    )
    p.add_argument("--tokens", nargs="+", type=int, default=[2**k for k in range(10, 17)])
    p.add_argument("--dim", type=int, default=64, help="attention width (PVTv2-B1/B2 stage 1)")
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--sdpa-max-seconds", type=float, default=30.0)
    p.add_argument("--models", nargs="+", default=["pvt_v2_b0", "pvt_v2_b2"])
    p.add_argument(
        "--energy-models", nargs="+", default=["pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2", "litv2_s"]
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--min-run-time", type=float, default=0.5)
    p.add_argument(
        "--repeats", type=int, default=5, help="alternating standard/EcoFormer pairs (models)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (attention and models sections)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="small sizes, B0 only (smoke run)")
    p.add_argument("--out", type=Path, default=Path("benchmark-results"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.tokens = [256, 1024, 4096]
        args.models = ["pvt_v2_b0"]
        args.energy_models = ["pvt_v2_b0"]
        args.batch = 2
        args.repeats = 2
        args.min_run_time = 0.1
    args.out.mkdir(parents=True, exist_ok=True)
    print(
        f"threads: {torch.get_num_threads()}; tokens: {args.tokens}; log2 range "
        f"{math.log2(min(args.tokens)):.0f}..{math.log2(max(args.tokens)):.0f}"
    )
    for section in args.sections:
        {"attention": bench_attention, "models": bench_models, "energy": bench_energy}[section](
            args
        )


if __name__ == "__main__":
    main()
