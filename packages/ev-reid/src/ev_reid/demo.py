"""``ev-reid demo`` / ``ev demo``: the whole pipeline on a generated dataset.

1. writes a synthetic Market-1501-format dataset;
2. UP-ReID pre-training (MoCo + I² terms) of a narrow ResNet-18 on its training images,
   labels ignored;
3. BoT fine-tuning from the pre-trained backbone;
4. evaluation (CMC, mAP, mINP under the Market protocol);
5. a gallery index (faiss when installed, else exact torch) and a search for a few queries;
6. ``ranked_lists.png`` (query + top-10, true matches framed green, others red) and
   ``metrics.json``.

Full mode takes a few minutes on 2 CPU cores; ``quick=True`` runs tiny sizes in well under a
minute.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ev_core.io import write_json
from ev_core.repro import seed_everything

__all__ = ["DemoSizes", "plot_ranked_lists", "run_demo"]


@dataclass(frozen=True)
class DemoSizes:
    """Sizes of one demo mode."""

    num_ids: int
    images_per_id: int
    num_cameras: int
    image_size: tuple[int, int]
    channels: tuple[int, int, int, int]
    pretrain_epochs: int
    pretrain_batch: int
    finetune_epochs: int
    num_identities: int
    num_instances: int
    num_queries_shown: int


QUICK = DemoSizes(
    num_ids=16,
    images_per_id=8,
    num_cameras=3,
    image_size=(64, 32),
    channels=(8, 16, 16, 32),
    pretrain_epochs=1,
    pretrain_batch=16,
    finetune_epochs=3,
    num_identities=4,
    num_instances=4,
    num_queries_shown=3,
)
FULL = DemoSizes(
    num_ids=60,
    images_per_id=12,
    num_cameras=4,
    image_size=(128, 64),
    channels=(16, 32, 64, 128),
    pretrain_epochs=8,
    pretrain_batch=32,
    finetune_epochs=24,
    num_identities=8,
    num_instances=4,
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


def run_demo(out_dir: Path, quick: bool) -> dict[str, Any]:
    """Run the demo into ``out_dir`` (see the module docstring) and return its metrics.

    Args:
        out_dir: output folder (``data/``, ``pretrain/``, ``finetune/``, ``index/``,
            ``ranked_lists.png``, ``metrics.json``).
        quick: tiny sizes (seconds) instead of the full demo (minutes).

    Returns:
        ``rank1``, ``rank5``, ``rank10``, ``mAP``, ``mINP`` (fractions), the query count,
        the pre-training/fine-tuning summaries, the index backend and the timings.
    """
    from ev_core.ssl import PretrainConfig
    from ev_reid.data import PretrainViewConfig, ReidTransformConfig
    from ev_reid.datasets import Market1501, generate_synthetic_market
    from ev_reid.models import ReidModelConfig
    from ev_reid.pretrain import UPReIDConfig, pretrain_upreid
    from ev_reid.retrieval import IndexConfig
    from ev_reid.train import TrainConfig, build_index, search_index, train

    sizes = QUICK if quick else FULL
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(0)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    h, w = sizes.image_size
    root = generate_synthetic_market(
        out / "data",
        num_ids=sizes.num_ids,
        images_per_id=sizes.images_per_id,
        num_cameras=sizes.num_cameras,
        image_size=sizes.image_size,
        seed=0,
    )
    dataset = Market1501(root)
    print(dataset.summary())
    timings["data_s"] = time.perf_counter() - start

    backbone_kwargs = {"channels": list(sizes.channels), "stem_width": sizes.channels[0]}
    t = time.perf_counter()
    pre_cfg = UPReIDConfig(
        out_dir=str(out / "pretrain"),
        dataset="market1501",
        data_root=str(root),
        backbone="resnet18",
        backbone_kwargs=backbone_kwargs,
        last_stride_1=True,
        proj_hidden_dim=4 * sizes.channels[-1],
        proj_dim=64,
        views=PretrainViewConfig(height=h, width=w),
        ssl=PretrainConfig(
            method="moco",
            temperature=0.2,
            queue_size=1024,
            momentum=0.99,
            epochs=sizes.pretrain_epochs,
            optimizer="sgd",
            lr=0.3,
            warmup_steps=5,
            amp=False,
            seed=0,
            log_every_steps=5,
        ),
        batch_size=sizes.pretrain_batch,
        num_workers=0 if quick else 2,
    )
    pre = pretrain_upreid(pre_cfg)
    timings["pretrain_s"] = time.perf_counter() - t

    t = time.perf_counter()
    epochs = sizes.finetune_epochs
    ft_cfg = TrainConfig(
        out_dir=str(out / "finetune"),
        dataset="market1501",
        data_root=str(root),
        model=ReidModelConfig(
            backbone="resnet18", backbone_kwargs=backbone_kwargs, last_stride_1=True
        ),
        init_checkpoint=str(pre.backbone_path),
        transform=ReidTransformConfig(height=h, width=w, padding=max(2, h // 25)),
        num_identities=sizes.num_identities,
        num_instances=sizes.num_instances,
        epochs=epochs,
        lr=1e-3,
        warmup_epochs=max(1, epochs // 8),
        milestones=(int(epochs * 0.6), int(epochs * 0.85)),
        eval_every=0,
        num_workers=0 if quick else 2,
        device="cpu",
    )
    result = train(ft_cfg, dataset)
    timings["finetune_s"] = time.perf_counter() - t
    assert result.metrics is not None and result.model_path is not None

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
    m = result.metrics
    figure = plot_ranked_lists(
        rows,
        out / "ranked_lists.png",
        title=f"UP-ReID → BoT on synthetic Market: R1 {m['rank1']:.1%}, mAP {m['mAP']:.1%}",
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
            "steps": pre.steps,
            "images": pre.num_images,
            "final_loss": pre.history[-1]["loss"] if pre.history else None,
        },
        "finetune": {"epochs": epochs, "final_loss": result.history[-1]["loss"]},
        "index_backend": index.backend.value,
        "figure": str(figure),
        "quick": quick,
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    write_json(out / "metrics.json", metrics)
    print(
        f"Market protocol: R1 {m['rank1']:.4f}  R5 {m['rank5']:.4f}  R10 {m['rank10']:.4f}  "
        f"mAP {m['mAP']:.4f}  mINP {m['mINP']:.4f}  ({m['num_valid_queries']} queries)"
    )
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
