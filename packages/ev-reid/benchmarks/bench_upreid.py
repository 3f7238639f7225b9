"""UP-ReID ablation on the synthetic dataset: does the I² regularisation help fine-tuning?

Setting (a small-scale stand-in for LUPerson → Market-1501):

* a *labelled* synthetic Market-format dataset (train / query / gallery) and a disjoint
  *unlabelled* one (other identities, other seed) whose images — labels ignored — are the
  pre-training data;
* a narrow ResNet-18 (channels 16-32-64-128, last stride 1) at 64×32;
* three initialisations, each fine-tuned with the same BoT recipe and evaluated with the
  Market protocol (cosine distance):

  - ``scratch``: random initialisation;
  - ``moco``: MoCo-v2 pre-training without the I² terms (ablation);
  - ``upreid``: MoCo-v2 + global consistency (×1) + local stripe contrast (×0.5);

  optionally ``upreid-macl`` (MACL as the instance and local loss).

Every variant is repeated for several seeds (pre-training and fine-tuning seeds; the data is
fixed) and reported as mean ± std. Results go to JSON with the machine metadata.

    python packages/ev-reid/benchmarks/bench_upreid.py --out results/upreid.json --seeds 3
    python packages/ev-reid/benchmarks/bench_upreid.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ev_core.io import write_json
from ev_core.progress import set_quiet
from ev_core.repro import environment_info
from ev_core.ssl import PretrainConfig
from ev_reid.data import PretrainViewConfig, ReidTransformConfig
from ev_reid.datasets import Market1501, generate_synthetic_market
from ev_reid.models import ReidModelConfig
from ev_reid.pretrain import UPReIDConfig, pretrain_upreid
from ev_reid.records import ReidRecord
from ev_reid.train import TrainConfig, train

VARIANTS = ("scratch", "moco", "upreid", "upreid-macl")


@dataclass(frozen=True)
class Sizes:
    """Data and schedule sizes of one benchmark mode."""

    labelled_ids: int
    unlabelled_ids: int
    images_per_id: int
    image_size: tuple[int, int]
    channels: tuple[int, int, int, int]
    pretrain_epochs: int
    pretrain_batch: int
    finetune_epochs: int
    num_identities: int


FULL = Sizes(
    labelled_ids=80,
    unlabelled_ids=120,
    images_per_id=10,
    image_size=(64, 32),
    channels=(16, 32, 64, 128),
    pretrain_epochs=4,
    pretrain_batch=32,
    finetune_epochs=16,
    num_identities=8,
)
QUICK = Sizes(
    labelled_ids=16,
    unlabelled_ids=16,
    images_per_id=6,
    image_size=(64, 32),
    channels=(8, 16, 16, 32),
    pretrain_epochs=1,
    pretrain_batch=16,
    finetune_epochs=2,
    num_identities=4,
)


def pretrain_variant(
    variant: str, images: list[ReidRecord], out: Path, sizes: Sizes, seed: int
) -> Path:
    """Pre-train one variant on the unlabelled images; returns ``backbone.safetensors``."""
    h, w = sizes.image_size
    i2 = variant.startswith("upreid")
    loss = "macl" if variant.endswith("macl") else "infonce"
    cfg = UPReIDConfig(
        out_dir=str(out),
        backbone="resnet18",
        backbone_kwargs={"channels": list(sizes.channels), "stem_width": sizes.channels[0]},
        last_stride_1=True,
        proj_hidden_dim=4 * sizes.channels[-1],
        proj_dim=64,
        global_term=i2,
        local_term=i2,
        views=PretrainViewConfig(height=h, width=w),
        ssl=PretrainConfig(
            method="moco",
            loss=loss,  # type: ignore[arg-type]
            temperature=0.2,
            queue_size=2048,
            momentum=0.99,
            epochs=sizes.pretrain_epochs,
            optimizer="sgd",
            lr=0.3,
            warmup_steps=10,
            amp=False,
            seed=seed,
            log_every_steps=10,
        ),
        batch_size=sizes.pretrain_batch,
        num_workers=2,
    )
    result = pretrain_upreid(cfg, images)
    assert result.backbone_path is not None
    return result.backbone_path


def finetune(
    dataset: Market1501, init: Path | None, out: Path, sizes: Sizes, seed: int
) -> dict[str, Any]:
    """BoT fine-tuning + Market-protocol evaluation; returns the metrics."""
    h, w = sizes.image_size
    epochs = sizes.finetune_epochs
    cfg = TrainConfig(
        out_dir=str(out),
        model=ReidModelConfig(
            backbone="resnet18",
            backbone_kwargs={"channels": list(sizes.channels), "stem_width": sizes.channels[0]},
            last_stride_1=True,
        ),
        init_checkpoint=None if init is None else str(init),
        transform=ReidTransformConfig(height=h, width=w, padding=max(2, h // 25)),
        num_identities=sizes.num_identities,
        num_instances=4,
        epochs=epochs,
        lr=1e-3,
        warmup_epochs=max(1, epochs // 8),
        milestones=(int(epochs * 0.6), int(epochs * 0.85)),
        eval_every=0,
        num_workers=2,
        device="cpu",
        seed=seed,
    )
    result = train(cfg, dataset)
    assert result.metrics is not None
    return result.metrics


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed (smoke check)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 3)")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=["scratch", "moco", "upreid"],
        help="initialisations to compare",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="keep data and runs here")
    args = parser.parse_args()
    set_quiet(True)
    sizes = QUICK if args.quick else FULL
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        start = time.perf_counter()
        data = {
            name: Market1501(
                generate_synthetic_market(
                    work / name,
                    num_ids=num_ids,
                    images_per_id=sizes.images_per_id,
                    num_cameras=4,
                    image_size=sizes.image_size,
                    seed=seed,
                )
            )
            for name, num_ids, seed in (
                ("labelled", sizes.labelled_ids, 0),
                ("unlabelled", sizes.unlabelled_ids, 1),
            )
        }
        labelled, unlabelled_ds = data["labelled"], data["unlabelled"]
        unlabelled = unlabelled_ds.train + unlabelled_ds.query + unlabelled_ds.gallery
        print(labelled.summary())
        print(f"unlabelled pre-training images: {len(unlabelled)}")

        runs: list[dict[str, Any]] = []
        for seed in seeds:
            for variant in args.variants:
                t0 = time.perf_counter()
                init = None
                if variant != "scratch":
                    init = pretrain_variant(
                        variant, unlabelled, work / f"pre-{variant}-{seed}", sizes, seed
                    )
                t1 = time.perf_counter()
                metrics = finetune(labelled, init, work / f"ft-{variant}-{seed}", sizes, seed)
                t2 = time.perf_counter()
                run = {
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
                    f"seed {seed} {variant:12s} mAP {run['mAP']:.4f} R1 {run['rank1']:.4f} "
                    f"mINP {run['mINP']:.4f} (pretrain {run['pretrain_s']} s, finetune "
                    f"{run['finetune_s']} s)",
                    flush=True,
                )

        summary: dict[str, dict[str, float]] = {}
        lines = [
            "| initialisation | mAP (%) | R1 (%) | R5 (%) | mINP (%) | pre-train s | fine-tune s |",
            "|---|---|---|---|---|---|---|",
        ]
        for variant in args.variants:
            rows = [r for r in runs if r["variant"] == variant]
            stats: dict[str, float] = {}
            cells = []
            for key in ("mAP", "rank1", "rank5", "mINP"):
                mean, std = _mean_std([100 * r[key] for r in rows])
                stats[f"{key}_mean"], stats[f"{key}_std"] = mean, std
                cells.append(f"{mean:.1f} ± {std:.1f}")
            pre_s = statistics.fmean(r["pretrain_s"] for r in rows)
            ft_s = statistics.fmean(r["finetune_s"] for r in rows)
            summary[variant] = stats
            lines.append(f"| {variant} | {' | '.join(cells)} | {pre_s:.0f} | {ft_s:.0f} |")
        table = "\n".join(lines)
        print(f"\n## UP-ReID ablation ({len(seeds)} seed(s))\n\n{table}\n")
        print(f"total {time.perf_counter() - start:.0f} s")
        if args.out is not None:
            write_json(
                args.out,
                {
                    "suite": "upreid_ablation",
                    "metadata": environment_info(),
                    "sizes": sizes,
                    "seeds": seeds,
                    "num_unlabelled_images": len(unlabelled),
                    "runs": runs,
                    "summary": summary,
                    "table": table,
                    "total_s": round(time.perf_counter() - start, 1),
                },
            )


if __name__ == "__main__":
    main()
