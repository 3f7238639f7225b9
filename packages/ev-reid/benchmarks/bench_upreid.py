"""UP-ReID ablation on synthetic data: does the I² regularisation help fine-tuning, and why?

Setting (a small-scale stand-in for LUPerson → Market-1501), for each generator mode
(``aligned``: identity cues in fixed horizontal bands; ``unaligned``: random scale, vertical
offset, aspect/pose, occluders, textured garments, clutter — see
:mod:`ev_reid.datasets.synthetic`):

* a *labelled* synthetic Market-format dataset (train / query / gallery) and a disjoint
  *unlabelled* one (other identities, other seed) whose images — labels ignored — are the
  pre-training data;
* the recipe of :mod:`ev_reid.recipe` (narrow ResNet-18, MoCo-v2 pre-training, BoT
  fine-tuning, Market protocol with cosine distance), the same one ``ev-reid demo`` runs;
* the rows of :data:`ev_reid.recipe.VARIANTS`: ``scratch``, ``moco`` (no I²), ``global-only``,
  ``stripe-only``, ``upreid`` (both terms, local negatives from the whole batch) and
  ``upreid-image`` (local negatives from the same image only); optionally ``upreid-macl``.

Every row is repeated for several seeds (pre-training and fine-tuning seeds; the data is
fixed) and reported as mean ± std. Results go to JSON with the machine metadata; partial
results are written after every run.

    OMP_NUM_THREADS=1 python packages/ev-reid/benchmarks/bench_upreid.py --seeds 3 --out upreid.json
    python packages/ev-reid/benchmarks/bench_upreid.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ev_core.io import write_json
from ev_core.progress import set_quiet
from ev_core.repro import environment_info
from ev_reid.datasets import Market1501, generate_synthetic_market
from ev_reid.recipe import VARIANTS, SmallRecipe, finetune, pretrain_variant

DEFAULT_VARIANTS = ("scratch", "moco", "global-only", "stripe-only", "upreid", "upreid-image")
MODES = ("aligned", "unaligned")


@dataclass(frozen=True)
class Data:
    """Synthetic data sizes of one benchmark mode."""

    labelled_ids: int
    unlabelled_ids: int
    images_per_id: int
    num_cameras: int = 4


FULL = (Data(labelled_ids=80, unlabelled_ids=120, images_per_id=10), SmallRecipe())
QUICK = (
    Data(labelled_ids=16, unlabelled_ids=16, images_per_id=6),
    SmallRecipe(
        channels=(8, 16, 16, 32),
        pretrain_epochs=1,
        pretrain_batch=16,
        finetune_epochs=2,
        num_identities=4,
    ),
)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _datasets(work: Path, data: Data, recipe: SmallRecipe, mode: str) -> tuple[Market1501, list]:
    out = {}
    for name, num_ids, seed in (
        ("labelled", data.labelled_ids, 0),
        ("unlabelled", data.unlabelled_ids, 1),
    ):
        root = generate_synthetic_market(
            work / f"{mode}-{name}",
            num_ids=num_ids,
            images_per_id=data.images_per_id,
            num_cameras=data.num_cameras,
            image_size=recipe.image_size,
            seed=seed,
            mode=mode,
        )
        out[name] = Market1501(root)
    unl = out["unlabelled"]
    return out["labelled"], unl.train + unl.query + unl.gallery


def _table(runs: list[dict[str, Any]], modes: list[str], variants: list[str]) -> tuple[str, dict]:
    lines = [
        "| data | initialisation | mAP (%) | R1 (%) | R5 (%) | mINP (%) | pre-train s | fine-tune s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for mode in modes:
        for variant in variants:
            rows = [r for r in runs if r["variant"] == variant and r["mode"] == mode]
            if not rows:
                continue
            stats: dict[str, float] = {"runs": len(rows)}
            cells = []
            for key in ("mAP", "rank1", "rank5", "mINP"):
                mean, std = _mean_std([100 * r[key] for r in rows])
                stats[f"{key}_mean"], stats[f"{key}_std"] = mean, std
                cells.append(f"{mean:.1f} ± {std:.1f}")
            pre_s = statistics.fmean(r["pretrain_s"] for r in rows)
            ft_s = statistics.fmean(r["finetune_s"] for r in rows)
            summary.setdefault(mode, {})[variant] = stats
            lines.append(f"| {mode} | {variant} | {' | '.join(cells)} | {pre_s:.0f} | {ft_s:.0f} |")
    return "\n".join(lines), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed (smoke check)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per row (default 3)")
    parser.add_argument(
        "--first-seed", type=int, default=0, help="first seed (to add seeds to an earlier run)"
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(DEFAULT_VARIANTS),
        help="initialisations to compare",
    )
    parser.add_argument(
        "--pretrain-epochs", type=int, default=None, help="override (affordable runs)"
    )
    parser.add_argument(
        "--finetune-epochs", type=int, default=None, help="override (affordable runs)"
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="keep data and runs here")
    args = parser.parse_args()
    set_quiet(True)
    data, recipe = QUICK if args.quick else FULL
    if args.pretrain_epochs is not None or args.finetune_epochs is not None:
        from dataclasses import replace

        recipe = replace(
            recipe,
            pretrain_epochs=args.pretrain_epochs or recipe.pretrain_epochs,
            finetune_epochs=args.finetune_epochs or recipe.finetune_epochs,
        )
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    seeds = list(range(args.first_seed, args.first_seed + n_seeds))

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        start = time.perf_counter()
        runs: list[dict[str, Any]] = []
        counts: dict[str, Any] = {}
        data_by_mode = {}
        for mode in args.modes:
            labelled, unlabelled = _datasets(work, data, recipe, mode)
            data_by_mode[mode] = (labelled, unlabelled)
            counts[mode] = {
                "train": len(labelled.train),
                "query": len(labelled.query),
                "gallery": len(labelled.gallery),
                "unlabelled": len(unlabelled),
            }
            print(f"[{mode}]\n{labelled.summary()}\nunlabelled images: {len(unlabelled)}")
        for seed in seeds:  # seeds outermost: an interrupted run still covers every row
            for mode in args.modes:
                labelled, unlabelled = data_by_mode[mode]
                for variant in args.variants:
                    tag = f"{mode}-{variant}-{seed}"
                    t0 = time.perf_counter()
                    init = pretrain_variant(variant, unlabelled, work / f"pre-{tag}", recipe, seed)
                    t1 = time.perf_counter()
                    metrics = finetune(labelled, init, work / f"ft-{tag}", recipe, seed).metrics
                    assert metrics is not None
                    t2 = time.perf_counter()
                    run = {
                        "mode": mode,
                        "variant": variant,
                        "seed": seed,
                        "mAP": metrics["mAP"],
                        "rank1": metrics["rank1"],
                        "rank5": metrics["rank5"],
                        "mINP": metrics["mINP"],
                        "pretrain_s": round(t1 - t0, 1),
                        "finetune_s": round(t2 - t1, 1),
                    }
                    runs.append(run)
                    if args.out is not None:  # partial results survive an interrupted run
                        write_json(
                            args.out, {"suite": "upreid_ablation", "partial": True, "runs": runs}
                        )
                    print(
                        f"{mode:9s} seed {seed} {variant:12s} mAP {run['mAP']:.4f} "
                        f"R1 {run['rank1']:.4f} mINP {run['mINP']:.4f} (pretrain "
                        f"{run['pretrain_s']} s, finetune {run['finetune_s']} s)",
                        flush=True,
                    )

        table, summary = _table(runs, args.modes, args.variants)
        print(f"\n## UP-ReID ablation ({len(seeds)} seed(s))\n\n{table}\n")
        print(f"total {time.perf_counter() - start:.0f} s")
        if args.out is not None:
            write_json(
                args.out,
                {
                    "suite": "upreid_ablation",
                    "metadata": environment_info(),
                    "data": asdict(data),
                    "recipe": asdict(recipe),
                    "counts": counts,
                    "seeds": seeds,
                    "runs": runs,
                    "summary": summary,
                    "table": table,
                    "total_s": round(time.perf_counter() - start, 1),
                },
            )


if __name__ == "__main__":
    main()
