"""Data for semi-supervised domain adaptation: MME image lists, the digits shift, batching."""

from ev_adapt.data.batches import SSDABatch, SSDABatches
from ev_adapt.data.digits import digits_shift
from ev_adapt.data.domains import DomainData, ImageListDomainData, TensorDomainData
from ev_adapt.data.lists import (
    BENCHMARK_DOMAINS,
    ImageListError,
    ListEntry,
    SSDALists,
    mme_lists,
    read_image_list,
)

__all__ = [
    "BENCHMARK_DOMAINS",
    "DomainData",
    "ImageListDomainData",
    "ImageListError",
    "ListEntry",
    "SSDABatch",
    "SSDABatches",
    "SSDALists",
    "TensorDomainData",
    "digits_shift",
    "mme_lists",
    "read_image_list",
]
