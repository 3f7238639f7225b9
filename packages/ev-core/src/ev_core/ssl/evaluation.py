"""Frozen-feature evaluation: feature extraction, weighted k-NN and a logistic-regression probe.

The linear probe is multinomial logistic regression on (optionally standardised) frozen
features, ``mean CE + l2/2·‖W‖²`` (bias not penalised), solved full-batch with L-BFGS in
torch; ``backend="sklearn"`` solves the same objective with scikit-learn's
``LogisticRegression`` (``pip install ev-core[sklearn]``). A list of ``l2`` values is
selected on a held-out part of the training features, then the probe is refitted on all of
them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ev_core.progress import progress
from ev_core.ssl.encoder import EncoderOutput

__all__ = [
    "LinearProbeResult",
    "extract_features",
    "knn_accuracy",
    "knn_predict",
    "linear_probe",
]


@torch.no_grad()
def extract_features(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: torch.device | str | None = None,
    use_embedding: bool = False,
    desc: str = "features",
) -> tuple[Tensor, Tensor]:
    """Run ``model`` in eval mode over ``(images, labels, ...)`` batches.

    Args:
        model: returns ``[B, C]`` features or an :class:`EncoderOutput` (its ``features``, the
            pooled backbone output, are used unless ``use_embedding``).
        loader: yields ``(x, y)`` (further items ignored).
        device: where to run (default: the model's device).
        use_embedding: take ``EncoderOutput.embedding`` (projection output) instead.
        desc: progress-bar label.

    Returns:
        ``(features [N, C] float32 on the CPU, labels [N])``. The model's training mode is
        restored afterwards.
    """
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    feats: list[Tensor] = []
    labels: list[Tensor] = []
    try:
        for batch in progress(loader, desc=desc):
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise ValueError("feature extraction needs (images, labels) batches")
            x, y = batch[0], batch[1]
            out = model(x.to(device))
            if isinstance(out, EncoderOutput):
                out = out.embedding if use_embedding else out.features
            if not isinstance(out, Tensor) or out.ndim != 2:
                raise ValueError("the model must return [B, C] features or an EncoderOutput")
            feats.append(out.float().cpu())
            labels.append(torch.as_tensor(y).cpu())
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError("the loader yielded no batches")
    return torch.cat(feats), torch.cat(labels)


def _check_features(x: Tensor, y: Tensor, what: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{what} features must be [N, C], got {tuple(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{what} labels must be [N={x.shape[0]}], got {tuple(y.shape)}")
    if y.is_floating_point():
        raise TypeError(f"{what} labels must be integers, got {y.dtype}")


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Weighted k-NN on cosine similarity (InstDisc/DINO protocol).

    Each of the ``k`` nearest training samples votes for its class with weight
    ``exp(s/τ)``; ties between classes go to the smaller class index.

    Args:
        train_features: ``[N, C]``.
        train_labels: ``[N]`` integers in ``[0, num_classes)``.
        query_features: ``[Q, C]``.
        k: neighbours (clipped to ``N``).
        temperature: τ of the vote weights; ``float("inf")`` gives a plain majority vote.
        num_classes: default ``max(train_labels) + 1``.
        chunk_size: queries per similarity block (bounds memory to ``chunk_size × N``).

    Returns:
        ``[Q]`` predicted labels.
    """
    _check_features(train_features, train_labels, "train")
    if query_features.ndim != 2 or query_features.shape[1] != train_features.shape[1]:
        raise ValueError(
            f"query features must be [Q, {train_features.shape[1]}], got {tuple(query_features.shape)}"
        )
    if k < 1 or not temperature > 0 or chunk_size < 1:
        raise ValueError(
            f"need k >= 1, temperature > 0, chunk_size >= 1; got {k}, {temperature}, {chunk_size}"
        )
    n_cls = int(train_labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, train_features.shape[0])
    bank = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(bank.device).long()
    preds = []
    for start in range(0, query_features.shape[0], chunk_size):
        q = F.normalize(query_features[start : start + chunk_size].float().to(bank.device), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sim / temperature).exp() if temperature != float("inf") else torch.ones_like(sim)
        votes = torch.zeros(q.shape[0], n_cls, device=bank.device, dtype=weights.dtype)
        votes.scatter_add_(1, labels[idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    **kwargs: Any,
) -> float:
    """Top-1 accuracy of :func:`knn_predict` (keyword arguments forwarded)."""
    _check_features(test_features, test_labels, "test")
    preds = knn_predict(train_features, train_labels, test_features, **kwargs)
    return float((preds.cpu() == test_labels.cpu().long()).float().mean())


@dataclass
class LinearProbeResult:
    """Outcome of :func:`linear_probe`.

    Attributes:
        accuracy: top-1 accuracy on the test features.
        train_accuracy: top-1 accuracy on the training features.
        l2: the L2 strength used (selected when several were given).
        val_accuracy: held-out accuracy per candidate ``l2`` (empty with a single value).
        weight: ``[num_classes, C]`` classifier weights (in standardised space if used).
        bias: ``[num_classes]``.
        mean: ``[C]`` feature mean used for standardisation (``None`` if not standardised).
        std: ``[C]`` feature std used for standardisation (``None`` if not standardised).
    """

    accuracy: float
    train_accuracy: float
    l2: float
    val_accuracy: dict[float, float]
    weight: Tensor
    bias: Tensor
    mean: Tensor | None
    std: Tensor | None

    def predict(self, features: Tensor) -> Tensor:
        """``[N, C]`` features → ``[N]`` predicted labels."""
        x = features.to(self.weight.dtype)
        if self.mean is not None and self.std is not None:
            x = (x - self.mean) / self.std
        return (x @ self.weight.T + self.bias).argmax(dim=1)


def _fit_logreg_torch(
    x: Tensor, y: Tensor, num_classes: int, l2: float, max_iter: int
) -> tuple[Tensor, Tensor]:
    w = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _fit_logreg_sklearn(
    x: Tensor, y: Tensor, num_classes: int, l2: float, max_iter: int
) -> tuple[Tensor, Tensor]:
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "backend='sklearn' needs scikit-learn: pip install ev-core[sklearn]"
        ) from exc
    # sklearn minimises C·Σ CE + ½‖W‖², i.e. mean CE + ‖W‖²/(2·C·n): C = 1/(l2·n).
    clf = LogisticRegression(C=1.0 / (l2 * x.shape[0]), max_iter=max_iter, tol=1e-10)
    clf.fit(x.numpy(), y.numpy())
    w = torch.zeros(num_classes, x.shape[1], dtype=x.dtype)
    b = torch.zeros(num_classes, dtype=x.dtype)
    classes = torch.as_tensor(clf.classes_).long()
    coef, intercept = (
        torch.as_tensor(clf.coef_, dtype=x.dtype),
        torch.as_tensor(clf.intercept_, dtype=x.dtype),
    )
    if len(classes) == 2 and coef.shape[0] == 1:  # binary: sklearn stores one logit
        coef = torch.cat([-coef / 2, coef / 2])
        intercept = torch.cat([-intercept / 2, intercept / 2])
    w[classes], b[classes] = coef, intercept
    return w, b


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    l2: float | Sequence[float] = 1e-4,
    standardize: bool = True,
    max_iter: int = 500,
    val_fraction: float = 0.2,
    num_classes: int | None = None,
    backend: Literal["torch", "sklearn"] = "torch",
    seed: int = 0,
) -> LinearProbeResult:
    """Multinomial logistic-regression probe on frozen features (float64 internally).

    Args:
        train_features: ``[N, C]``.
        train_labels: ``[N]`` integers.
        test_features: ``[M, C]``.
        test_labels: ``[M]``.
        l2: L2 strength on the weights (objective ``mean CE + l2/2·‖W‖²``), or candidates to
            select from on a held-out ``val_fraction`` of the training features.
        standardize: z-score features with the training mean/std first.
        max_iter: solver iterations.
        val_fraction: held-out fraction for the ``l2`` selection.
        num_classes: default ``max label + 1``.
        backend: ``"torch"`` (L-BFGS) or ``"sklearn"`` (``LogisticRegression``, lbfgs).
        seed: seed of the held-out split.

    Returns:
        :class:`LinearProbeResult`.
    """
    _check_features(train_features, train_labels, "train")
    _check_features(test_features, test_labels, "test")
    if test_features.shape[1] != train_features.shape[1]:
        raise ValueError("train and test features have different dimensions")
    if backend not in ("torch", "sklearn"):
        raise ValueError(f"backend must be 'torch' or 'sklearn', got {backend!r}")
    candidates = [float(l2)] if isinstance(l2, (int, float)) else [float(v) for v in l2]
    if not candidates or any(not v > 0 for v in candidates):
        raise ValueError(f"l2 must be > 0 (or a non-empty list of such), got {l2}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    x = train_features.detach().double().cpu()
    y = train_labels.detach().long().cpu()
    xt = test_features.detach().double().cpu()
    yt = test_labels.detach().long().cpu()
    n_cls = int(max(int(y.max()), int(yt.max()))) + 1 if num_classes is None else num_classes
    mean = std = None
    if standardize:
        mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-8)
        x, xt = (x - mean) / std, (xt - mean) / std
    fit = _fit_logreg_torch if backend == "torch" else _fit_logreg_sklearn

    val_acc: dict[float, float] = {}
    chosen = candidates[0]
    if len(candidates) > 1:
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(x.shape[0], generator=gen)
        n_val = max(1, round(val_fraction * x.shape[0]))
        val, tr = perm[:n_val], perm[n_val:]
        for value in candidates:
            w, b = fit(x[tr], y[tr], n_cls, value, max_iter)
            val_acc[value] = float(((x[val] @ w.T + b).argmax(1) == y[val]).double().mean())
        chosen = max(candidates, key=lambda v: (val_acc[v], v))  # ties → stronger regularisation
    w, b = fit(x, y, n_cls, chosen, max_iter)
    return LinearProbeResult(
        accuracy=float(((xt @ w.T + b).argmax(1) == yt).double().mean()),
        train_accuracy=float(((x @ w.T + b).argmax(1) == y).double().mean()),
        l2=chosen,
        val_accuracy=val_acc,
        weight=w,
        bias=b,
        mean=mean,
        std=std,
    )
