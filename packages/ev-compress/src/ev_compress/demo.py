"""``ev demo`` for ev-compress: one section per method, one ``metrics.json``.

* Mesa (:mod:`ev_compress.mesa.demo`): a small ViT-S on upsampled digits with and without
  8-bit activations, with model EMA, both checkpointing modes and bf16 AMP (``mesa_loss.png``).
* EcoFormer (:mod:`ev_compress.ecoformer.demo`) and SPViT (:mod:`ev_compress.spvit.demo`),
  when those modules are present.

Each section writes its own figures and config beside ``metrics.json``; their paths are
printed at the end. Three sizes: ``quick`` (smoke runs, seconds), the default (``ev demo``, about
25 s) and ``full`` (``ev demo --full``, minutes); all on one torch thread.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import time
from pathlib import Path
from typing import Any

import torch

from ev_core.io import write_json

__all__ = ["run_demo"]

#: Section name → module with ``run_demo_section(out_dir, quick) -> dict``.
SECTIONS = {
    "mesa": "ev_compress.mesa.demo",
    "ecoformer": "ev_compress.ecoformer.demo",
    "spvit": "ev_compress.spvit.demo",
}


def _figures(out_dir: Path, section: dict[str, Any]) -> list[str]:
    """The figure paths a section reports (``figures``, ``figure`` or PNGs among ``files``)."""
    found = [str(p) for p in section.get("figures", [])]
    if isinstance(section.get("figure"), str):
        found.append(section["figure"])
    found += [str(out_dir / f) for f in section.get("files", []) if str(f).endswith(".png")]
    return found


def run_demo(out_dir: Path, quick: bool, full: bool = False) -> dict[str, Any]:
    """Run every section present; write ``metrics.json`` and print the figures' paths.

    Args:
        out_dir: output folder (created).
        quick: smoke runs (seconds).
        full: the longer versions (``ev demo --full``, minutes). Neither: the default demo,
            about 45 s on 2 idle cores.

    Returns:
        ``{section: metrics, "seconds": {section: s}, "figures": [...]}`` as written to
        ``metrics.json``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    # the demo models are tiny: one thread is as fast, and a second OpenMP thread spinning at
    # every small op's barrier made the default demo 12× slower on a shared machine (measured)
    metrics: dict[str, Any] = {"seconds": {}, "figures": [], "threads": 1}
    torch.set_num_threads(1)
    try:
        for name, module_name in SECTIONS.items():
            if importlib.util.find_spec(module_name) is None:
                continue
            module = importlib.import_module(module_name)
            start = time.perf_counter()
            run = module.run_demo_section
            full_kw = {"full": True} if full and "full" in inspect.signature(run).parameters else {}
            section = run(out_dir, quick, **full_kw)
            metrics["seconds"][name] = time.perf_counter() - start
            metrics[name] = section
            metrics["figures"] += _figures(out_dir, section)
    finally:
        torch.set_num_threads(threads)
    write_json(out_dir / "metrics.json", metrics)
    for path in metrics["figures"]:
        print(f"figure: {path}")
    print(f"metrics: {out_dir / 'metrics.json'}")
    return metrics
