"""Benchmark harness used by every ev package's ``benchmarks/`` scripts.

A :class:`BenchmarkSuite` collects rows, each timed with :mod:`torch.utils.benchmark` (warm-up,
then ``blocked_autorange``; CUDA is synchronised by the timer), reports the median and the
inter-quartile range, optionally the peak memory, and the ratio against the row marked as the
baseline of its group *in the same run*. It prints a table and writes JSON with the machine
metadata (git sha, torch version, device, threads)::

    suite = BenchmarkSuite("attention")
    suite.add("hilo 56x56 fp32", hilo_fn, group="56x56 fp32")
    suite.add("sra 56x56 fp32", sra_fn, group="56x56 fp32", baseline=True)
    suite.print_table()
    suite.write_json("results/attention.json")
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.utils.benchmark as tbench

from ev_core.io import write_json
from ev_core.repro import environment_info

__all__ = ["BenchmarkRow", "BenchmarkSuite", "measure_peak_memory", "time_function"]


@dataclass
class BenchmarkRow:
    """One measured configuration."""

    name: str
    group: str
    median_ms: float
    iqr_ms: float
    runs: int
    baseline: bool = False
    peak_memory_mib: float | None = None
    items_per_call: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    ratio_vs_baseline: float | None = None  # baseline time / this time (>1 = faster)
    memory_ratio_vs_baseline: float | None = None  # this memory / baseline memory

    @property
    def throughput(self) -> float | None:
        """Items per second, when ``items_per_call`` is known."""
        if self.items_per_call is None or self.median_ms <= 0:
            return None
        return self.items_per_call / (self.median_ms / 1e3)


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_function(
    fn: Callable[[], Any],
    *,
    warmup: int = 3,
    min_run_time: float = 1.0,
    device: torch.device | str | None = None,
) -> tuple[float, float, int]:
    """Time ``fn()``: ``warmup`` untimed calls, then ``Timer.blocked_autorange``.

    Returns:
        ``(median_ms, iqr_ms, number_of_measurements)``.
    """
    dev = torch.device(device) if device is not None else None
    for _ in range(warmup):
        fn()
    _sync(dev)
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3, m.iqr * 1e3, len(m.times)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Peak memory of one call of ``fn`` in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` above the memory allocated before the call.
    CPU (Linux): the peak resident set size sampled every 0.5 ms by a thread, above the
    RSS before the call (an estimate: allocations shorter than the sampling period may be
    missed, and freed memory the allocator keeps counts as resident).
    """
    dev = torch.device(device)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        start = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        return (torch.cuda.max_memory_allocated(dev) - start) / 2**20
    if not os.path.exists("/proc/self/statm"):
        raise RuntimeError("CPU peak memory needs /proc (Linux)")
    start = _rss_bytes()
    peak = start
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        stop.set()
        thread.join()
    peak = max(peak, _rss_bytes())
    return (peak - start) / 2**20


class BenchmarkSuite:
    """Collects benchmark rows, computes ratios against each group's baseline, reports them.

    Args:
        name: suite name (also the default JSON file stem).
        device: device the suite runs on (recorded in the metadata, used for syncing).
        min_run_time: seconds of timed runs per row.
        warmup: untimed calls per row.
    """

    def __init__(
        self,
        name: str,
        *,
        device: torch.device | str = "cpu",
        min_run_time: float = 1.0,
        warmup: int = 3,
    ) -> None:
        self.name = name
        self.device = torch.device(device)
        self.min_run_time = min_run_time
        self.warmup = warmup
        self.rows: list[BenchmarkRow] = []
        self.notes: dict[str, Any] = {}

    def add(
        self,
        name: str,
        fn: Callable[[], Any],
        *,
        group: str = "",
        baseline: bool = False,
        memory: bool = False,
        items_per_call: int | None = None,
        **extra: Any,
    ) -> BenchmarkRow:
        """Time ``fn`` (and its peak memory if ``memory``) and append a row.

        Args:
            name: row label.
            fn: zero-argument callable doing one unit of work.
            group: rows in the same group are compared with that group's baseline.
            baseline: mark this row as its group's baseline (at most one per group).
            memory: also measure peak memory of one call.
            items_per_call: e.g. the batch size, to report throughput.
            **extra: JSON-able fields stored with the row (shapes, dtype, ...).
        """
        if baseline and any(r.baseline and r.group == group for r in self.rows):
            raise ValueError(f"group {group!r} already has a baseline")
        median, iqr, runs = time_function(
            fn, warmup=self.warmup, min_run_time=self.min_run_time, device=self.device
        )
        peak = measure_peak_memory(fn, self.device) if memory else None
        row = BenchmarkRow(
            name=name,
            group=group,
            median_ms=median,
            iqr_ms=iqr,
            runs=runs,
            baseline=baseline,
            peak_memory_mib=peak,
            items_per_call=items_per_call,
            extra=dict(extra),
        )
        self.rows.append(row)
        self._update_ratios()
        return row

    def add_failure(self, name: str, group: str, reason: str, **extra: Any) -> None:
        """Record a configuration that could not run (e.g. out of memory) with its reason."""
        self.rows.append(
            BenchmarkRow(
                name=name,
                group=group,
                median_ms=float("nan"),
                iqr_ms=float("nan"),
                runs=0,
                extra={"failed": reason, **extra},
            )
        )

    def _update_ratios(self) -> None:
        baselines = {r.group: r for r in self.rows if r.baseline}
        for row in self.rows:
            base = baselines.get(row.group)
            if base is None or row.runs == 0:
                continue
            row.ratio_vs_baseline = base.median_ms / row.median_ms
            if base.peak_memory_mib and row.peak_memory_mib is not None:
                row.memory_ratio_vs_baseline = row.peak_memory_mib / base.peak_memory_mib

    def table(self) -> str:
        """The rows as a Markdown table (ratio = baseline time / row time)."""
        header = "| group | name | median ms | IQR ms | items/s | peak MiB | speed vs base | mem vs base |"
        lines = [header, "|" + "---|" * 8]

        def fmt(v: float | None, spec: str) -> str:
            return "–" if v is None or v != v else format(v, spec)

        for r in self.rows:
            name = r.name + (" (baseline)" if r.baseline else "")
            if r.runs == 0:
                lines.append(f"| {r.group} | {name} | failed: {r.extra.get('failed')} | | | | | |")
                continue
            lines.append(
                f"| {r.group} | {name} | {fmt(r.median_ms, '.3f')} | {fmt(r.iqr_ms, '.3f')} | "
                f"{fmt(r.throughput, ',.1f')} | {fmt(r.peak_memory_mib, ',.1f')} | "
                f"{fmt(r.ratio_vs_baseline, '.2f')}× | {fmt(r.memory_ratio_vs_baseline, '.2f')} |"
            )
        return "\n".join(lines)

    def print_table(self) -> None:
        """Print :meth:`table` with a title line."""
        print(f"\n## {self.name} ({self.device})\n")
        print(self.table())

    def to_dict(self) -> dict[str, Any]:
        """Suite results plus machine metadata, ready for JSON."""
        meta = environment_info()
        meta["benchmark_device"] = str(self.device)
        return {
            "suite": self.name,
            "metadata": meta,
            "notes": self.notes,
            "rows": [{**r.__dict__, "throughput": r.throughput} for r in self.rows],
        }

    def write_json(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write :meth:`to_dict` as JSON (default ``benchmark-results/<name>.json``)."""
        dest = Path(path) if path is not None else Path("benchmark-results") / f"{self.name}.json"
        return write_json(dest, self.to_dict())
