"""``ev-reid demo`` / ``ev demo``: the whole pipeline on a generated dataset.

1. writes a synthetic Market-1501-format dataset;
2. UP-ReID pre-training (MoCo + I² terms) of a narrow ResNet-18 on its training images,
   labels ignored (:mod:`ev_reid.recipe`, the recipe the UP-ReID benchmark also runs);
3. BoT fine-tuning from the pre-trained backbone;
4. evaluation (CMC, mAP, mINP under the Market protocol);
5. a gallery index (faiss when installed, else exact torch) and a search for a few queries;
6. ``ranked_lists.png`` (query + top-10, true matches framed green, others red) and
   ``metrics.json``.

The default run takes about 30-45 s on 2 idle CPU cores; ``quick=True`` runs tiny sizes in
about 10 s and ``full=True`` (``ev-reid demo --full``) a larger dataset and schedule in a few
minutes. Without matplotlib the metrics are still written and the skipped figure is named.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ev_core.io import write_json
from ev_core.repro import seed_everything
from ev_reid.recipe import SmallRecipe

__all__ = ["DEFAULT", "FULL", "QUICK", "DemoSizes", "plot_ranked_lists", "run_demo"]


@dataclass(frozen=True)
class DemoSizes:
    """Sizes of one demo mode: the synthetic data and the :class:`SmallRecipe`."""

    num_ids: int
    images_per_id: int
    num_cameras: int
    recipe: SmallRecipe
    num_queries_shown: int


QUICK = DemoSizes(
    num_ids=16,
    images_per_id=8,
    num_cameras=3,
    recipe=SmallRecipe(
        channels=(8, 16, 16, 32),
        pretrain_epochs=1,
        pretrain_batch=16,
        queue_size=1024,
        warmup_steps=5,
        finetune_epochs=3,
        num_identities=4,
    ),
    num_queries_shown=3,
)
DEFAULT = DemoSizes(
    num_ids=50,
    images_per_id=8,
    num_cameras=4,
    recipe=SmallRecipe(
        pretrain_epochs=2,
        pretrain_batch=32,
        queue_size=1024,
        warmup_steps=5,
        finetune_epochs=10,
        num_identities=8,
    ),
    num_queries_shown=5,
)
FULL = DemoSizes(
    num_ids=60,
    images_per_id=12,
    num_cameras=4,
    recipe=SmallRecipe(
        image_size=(128, 64),
        pretrain_epochs=8,
        queue_size=1024,
        warmup_steps=5,
        finetune_epochs=24,
        num_workers=2,
    ),
    num_queries_shown=6,
)


def plot_ranked_lists(
    rows: list[tuple[Any, list[tuple[Any, bool]]]],
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """Draw ranked lists: one row per query (query image, then its ranked gallery images).

    Args:
        rows: ``(query_record, [(gallery_record, is_true_match), ...])`` per query.
        path: PNG to write.
        title: figure title.

    Raises:
        ImportError: naming the ``plot`` extra when matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "the ranked-list figure needs matplotlib: pip install ev-reid[plot]"
        ) from exc
    from ev_reid.datasets import read_image

    ncols = 1 + max(len(hits) for _, hits in rows)
    fig, axes = plt.subplots(
        len(rows), ncols, figsize=(1.1 * ncols, 2.2 * len(rows)), squeeze=False
    )
    for r, (query, hits) in enumerate(rows):
        cells = [(query, None), *hits]
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(cells):
                ax.axis("off")
                continue
            rec, good = cells[c]
            ax.imshow(read_image(rec.path))
            colour = "black" if good is None else ("#1a9641" if good else "#d7191c")
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3.0 if good is not None else 1.5)
            label = (
                f"query\nid {rec.pid} c{rec.camid + 1}" if good is None else f"{c}\nid {rec.pid}"
            )
            ax.set_title(label, fontsize=7, color=colour)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run_demo(out_dir: Path, quick: bool, full: bool = False) -> dict[str, Any]:
    """Run the demo into ``out_dir`` (see the module docstring) and return its metrics.

    Args:
        out_dir: output folder (``data/``, ``pretrain/``, ``finetune/``, ``index/``,
            ``ranked_lists.png``, ``metrics.json``).
        quick: tiny sizes (seconds).
        full: the larger run (minutes); ignored with ``quick``.

    Returns:
        ``rank1``, ``rank5``, ``rank10``, ``mAP``, ``mINP`` (fractions), the query count,
        the pre-training/fine-tuning summaries, the index backend, the figure (or why it was
        skipped) and the timings.
    """
    from ev_reid.datasets import Market1501, generate_synthetic_market
    from ev_reid.inference import build_index, search_index
    from ev_reid.recipe import finetune, pretrain_variant
    from ev_reid.retrieval import IndexConfig

    sizes = QUICK if quick else FULL if full else DEFAULT
    recipe = sizes.recipe
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    has_plot = importlib.util.find_spec("matplotlib") is not None  # checked before the work
    if not has_plot:
        print(
            "matplotlib is not installed: ranked_lists.png will be skipped, metrics.json is "
            "still written (pip install 'ev-reid[plot]' for the figure)"
        )
    seed_everything(0)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    root = generate_synthetic_market(
        out / "data",
        num_ids=sizes.num_ids,
        images_per_id=sizes.images_per_id,
        num_cameras=sizes.num_cameras,
        image_size=recipe.image_size,
        seed=0,
    )
    dataset = Market1501(root)
    print(dataset.summary())
    timings["data_s"] = time.perf_counter() - start

    t = time.perf_counter()
    backbone = pretrain_variant("upreid", dataset.train, out / "pretrain", recipe, seed=0)
    timings["pretrain_s"] = time.perf_counter() - t

    t = time.perf_counter()
    result = finetune(dataset, backbone, out / "finetune", recipe, seed=0)
    timings["finetune_s"] = time.perf_counter() - t
    m = result.metrics
    assert m is not None and result.model_path is not None

    t = time.perf_counter()
    index = build_index(
        result.model_path, dataset.gallery, out / "index", config=IndexConfig(), device="cpu"
    )
    shown = _pick_queries(dataset.query, dataset.gallery, sizes.num_queries_shown)
    hits = search_index(out / "index", shown, k=min(len(index), 40), device="cpu")
    rows = []
    for q, ranked in zip(shown, hits):
        kept = [
            hit.record
            for hit in ranked
            if not (hit.record.pid == q.pid and hit.record.camid == q.camid)
        ]
        rows.append((q, [(g, g.pid == q.pid) for g in kept[:10]]))
    figure: str | None = None
    if has_plot:
        figure = str(
            plot_ranked_lists(
                rows,
                out / "ranked_lists.png",
                title=f"UP-ReID → BoT on synthetic Market: R1 {m['rank1']:.1%}, mAP {m['mAP']:.1%}",
            )
        )
    timings["index_search_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start

    metrics: dict[str, Any] = {
        "rank1": m["rank1"],
        "rank5": m["rank5"],
        "rank10": m["rank10"],
        "mAP": m["mAP"],
        "mINP": m["mINP"],
        "num_valid_queries": m["num_valid_queries"],
        "num_gallery": len(dataset.gallery),
        "pretrain": {
            "epochs": recipe.pretrain_epochs,
            "images": len(dataset.train),
        },
        "finetune": {"epochs": recipe.finetune_epochs, "final_loss": result.history[-1]["loss"]},
        "index_backend": index.backend.value,
        "figures": [figure] if figure else [],
        "skipped_figures": (
            [] if figure else [{"figure": "ranked_lists.png", "reason": "matplotlib not installed"}]
        ),
        "mode": "quick" if quick else "full" if full else "default",
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    write_json(out / "metrics.json", metrics)
    print(
        f"Market protocol: R1 {m['rank1']:.4f}  R5 {m['rank5']:.4f}  R10 {m['rank10']:.4f}  "
        f"mAP {m['mAP']:.4f}  mINP {m['mINP']:.4f}  ({m['num_valid_queries']} queries)"
    )
    print(f"metrics: {out / 'metrics.json'}")
    if figure:
        print(f"figure: {figure}")
    else:
        print("figure skipped: ranked_lists.png (matplotlib not installed)")
    return metrics


def _pick_queries(query: list[Any], gallery: list[Any], n: int) -> list[Any]:
    """``n`` queries of distinct identities that have a cross-camera match in the gallery."""
    valid = {(g.pid, g.camid) for g in gallery}
    chosen, seen = [], set()
    for q in query:
        has_match = any(pid == q.pid and cam != q.camid for pid, cam in valid)
        if has_match and q.pid not in seen:
            chosen.append(q)
            seen.add(q.pid)
        if len(chosen) == n:
            break
    return chosen
