"""EcoFormer: energy-saving attention with linear complexity (Liu et al., NeurIPS'22, arXiv 2209.09004).

Binary-hash linear attention for timm PVTv2 and ev LIT/LITv2 models::

    import timm, torch
    from ev_compress import ecoformer

    model = timm.create_model("pvt_v2_b0", pretrained=True)
    ecoformer.convert(model, stages=(0, 1, 2))   # MSA weights → shared qk / v
    ecoformer.fit_hash(model, [images])          # one explicit KSH fit (paper: once)
    logits = model(images)                        # O(N·b·d) attention in stages 1–3

* :class:`KernelizedHash` — kernelised supervised hashing, explicit :meth:`~KernelizedHash.fit`,
  state in buffers (saved/loaded with the model).
* :class:`EcoAttention` — shared-QK hash attention (``form="sum"`` exact kernel sum, or
  ``"token"`` as in the official code and its checkpoints).
* :func:`convert` / :func:`fit_hash` / :func:`revert`, :func:`load_official_checkpoint`.
* :func:`eco_attention` (float path), :func:`packed_eco_attention` (bit-packed codes, popcount;
  Triton on CUDA).
"""

from ev_compress.ecoformer.attention import EcoAttention
from ev_compress.ecoformer.checkpoint import load_official_checkpoint, official_to_timm
from ev_compress.ecoformer.convert import convert, eco_attentions, fit_hash, revert
from ev_compress.ecoformer.functional import FORMS, code_matmul, eco_attention
from ev_compress.ecoformer.hashing import (
    HashNotFittedError,
    KernelizedHash,
    sign_ste,
    similarity_targets,
)
from ev_compress.ecoformer.packed import (
    hamming_distance,
    pack_codes,
    packed_eco_attention,
    popcount32,
    unpack_codes,
)

__all__ = [
    "FORMS",
    "EcoAttention",
    "HashNotFittedError",
    "KernelizedHash",
    "code_matmul",
    "convert",
    "eco_attention",
    "eco_attentions",
    "fit_hash",
    "hamming_distance",
    "load_official_checkpoint",
    "official_to_timm",
    "pack_codes",
    "packed_eco_attention",
    "popcount32",
    "revert",
    "sign_ste",
    "similarity_targets",
    "unpack_codes",
]
