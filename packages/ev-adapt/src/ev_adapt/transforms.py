"""MCL's image augmentations for MME-list benchmarks (SYSTEMS §6)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

__all__ = ["mme_transforms"]

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def mme_transforms(
    size: int = 224,
) -> tuple[Callable[[object], Tensor], Callable[[object], Tensor], Callable[[object], Tensor]]:
    """``(weak, strong, test)``: weak = Resize(256) + flip + RandomCrop(224, pad 28, reflect);
    strong = weak + RandAugment(2, 10); test = Resize(256) + CenterCrop(224)."""
    from torchvision import transforms as T

    resize = T.Resize((256, 256))
    to_tensor = [T.ToTensor(), T.Normalize(MEAN, STD)]
    weak_ops = [
        resize,
        T.RandomHorizontalFlip(),
        T.RandomCrop(size, padding=28, padding_mode="reflect"),
    ]
    weak = T.Compose([*weak_ops, *to_tensor])
    strong = T.Compose([*weak_ops, T.RandAugment(num_ops=2, magnitude=10), *to_tensor])
    test = T.Compose([resize, T.CenterCrop(size), *to_tensor])
    return weak, strong, test
