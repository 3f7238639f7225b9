"""Every package's GPU benchmark rows in one run: one JSON and one markdown table.

Usage (also ``nox -s gpu-bench``)::

    python benchmarks/gpu_bench.py --out gpu-bench            # on a CUDA machine
    python benchmarks/gpu_bench.py --list                     # the plan, anywhere

Each entry of :data:`PLAN` runs one package benchmark script with ``--device cuda`` and GPU
sizes under its own time limit (the limits add up to 8 minutes), writing its JSON beside the
combined ``gpu-bench.json`` / ``gpu-bench.md``. An entry that fails or runs out of time is
recorded as such and the others still run. Without a CUDA device the script says why and
exits with status 0 (nothing to measure), so that it can sit in any automation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 480


@dataclass(frozen=True)
class Entry:
    """One benchmark script run on the GPU."""

    name: str
    script: str  # relative to the repository root
    args: tuple[str, ...]
    budget_s: int


PLAN: tuple[Entry, ...] = (
    Entry(
        "ev-core: LIT/LITv2 vs timm baselines, eager/compile, infer/train",
        "packages/ev-core/benchmarks/bench_models.py",
        (
            "--device",
            "cuda",
            "--batch-sizes",
            "64",
            "--dtypes",
            "fp32",
            "bf16",
            "--modes",
            "eager",
            "compile",
            "--tasks",
            "infer",
            "train",
            "--min-run-time",
            "0.5",
        ),
        150,
    ),
    Entry(
        "ev-core: attention (HiLo vs window vs SRA)",
        "packages/ev-core/benchmarks/bench_attention.py",
        ("--device", "cuda", "--resolutions", "14", "28", "56"),
        30,
    ),
    Entry(
        "ev-compress: Mesa memory and step time vs AMP",
        "packages/ev-compress/benchmarks/bench_mesa.py",
        (
            "--device",
            "cuda",
            "--batch-sizes",
            "64",
            "128",
            "--amp",
            "fp16",
            "--min-run-time",
            "0.5",
        ),
        90,
    ),
    Entry(
        "ev-compress: EcoFormer attention scaling vs SDPA",
        "packages/ev-compress/benchmarks/bench_ecoformer.py",
        (
            "--device",
            "cuda",
        ),
        45,
    ),
    Entry(
        "ev-points: knn / ball query / FPS, native (torch on CUDA) vs naive",
        "packages/ev-points/benchmarks/bench_ops.py",
        (
            "--device",
            "cuda",
        ),
        45,
    ),
    Entry(
        "ev-video: STPT local vs global attention",
        "packages/ev-video/benchmarks/bench_stpt.py",
        ("--min-run-time", "0.5"),  # adds its CUDA rows itself
        75,
    ),
    Entry(
        "ev-reid: exact retrieval, torch CUDA",
        "packages/ev-reid/benchmarks/bench_retrieval.py",
        ("--n", "1000000", "--skip", "hnsw", "ivfpq"),  # adds its CUDA rows itself
        45,
    ),
)
assert sum(e.budget_s for e in PLAN) <= TOTAL_BUDGET_S


def cuda_status() -> tuple[bool, str]:
    """Whether a CUDA device can run the benchmarks, and why not."""
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return (
            False,
            f"no CUDA device visible to torch {torch.__version__} (torch.cuda.is_available() is False)",
        )
    return True, torch.cuda.get_device_name(0)


def _table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| benchmark | row | group | median ms | items/s | peak MiB | × baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        if res["status"] != "ok":
            lines.append(
                f"| {res['name']} | **{res['status']}** | | | | | {res.get('reason', '')[:120]} |"
            )
            continue
        for row in res.get("rows", []):

            def num(key: str, spec: str, row: dict[str, Any] = row) -> str:
                value = row.get(key)
                return format(value, spec) if isinstance(value, (int, float)) else ""

            lines.append(
                f"| {res['name']} | {row.get('name', '')} | {row.get('group', '')} | {num('median_ms', '.2f')} | "
                f"{num('throughput', '.1f')} | {num('peak_memory_mib', '.0f')} | {num('ratio_vs_baseline', '.2f')} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("gpu-bench"), help="output folder")
    parser.add_argument("--list", action="store_true", help="print the plan and exit")
    parser.add_argument(
        "--only", nargs="+", default=None, help="entries whose name contains one of these"
    )
    args = parser.parse_args()
    plan = [e for e in PLAN if args.only is None or any(k in e.name for k in args.only)]
    if args.list:
        for e in plan:
            print(f"{e.budget_s:4d} s  {e.name}: python {e.script} {' '.join(e.args)}")
        return 0
    ok, device = cuda_status()
    if not ok:
        print(f"gpu-bench cannot run here: {device}. Run it on a machine with an NVIDIA GPU.")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for entry in plan:
        json_path = args.out / (
            entry.script.split("/")[1] + "-" + Path(entry.script).stem + ".json"
        )
        cmd = [sys.executable, str(ROOT / entry.script), *entry.args, "--out", str(json_path)]
        print(f"==> {entry.name} (limit {entry.budget_s} s): {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        record: dict[str, Any] = {"name": entry.name, "command": cmd}
        try:
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                timeout=entry.budget_s,
                capture_output=True,
                text=True,
                env={**os.environ, "EV_QUIET": "1"},
            )
            record["status"] = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            record["reason"] = (
                proc.stderr.strip().splitlines()[-1]
                if proc.returncode and proc.stderr.strip()
                else ""
            )
            (args.out / (json_path.stem + ".log")).write_text(proc.stdout + proc.stderr)
        except subprocess.TimeoutExpired:
            record["status"], record["reason"] = "timed out", f"over its {entry.budget_s} s limit"
        record["seconds"] = round(time.perf_counter() - start, 1)
        if record["status"] == "ok" and json_path.is_file():
            data = json.loads(json_path.read_text())
            record["rows"] = data.get("rows", [])
            record["environment"] = data.get("environment", data.get("machine"))
        results.append(record)
    table = _table(results)
    (args.out / "gpu-bench.md").write_text(f"GPU: {device}\n\n{table}\n")
    (args.out / "gpu-bench.json").write_text(
        json.dumps({"device": device, "results": results}, indent=2)
    )
    print(table)
    print(f"wrote {args.out / 'gpu-bench.json'} and {args.out / 'gpu-bench.md'}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
