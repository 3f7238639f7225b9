"""FLOP counting against analytic formulas."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ev_core.flops import count_flops
from ev_core.layers.attention import MultiHeadSelfAttention
from ev_core.layers.dtm import DeformableTokenMerging
from ev_core.layers.hilo import HiLo


class _OnMap(nn.Module):
    """Runs a token layer on an image-shaped input ``[B, C, H, W]``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> object:
        hw = (x.shape[2], x.shape[3])
        return self.layer(x.flatten(2).transpose(1, 2), hw)


def test_hilo_count_matches_paper_formula() -> None:
    m = HiLo(64, 4, qkv_bias=True, window_size=2, alpha=0.5)
    for hw in ((8, 8), (7, 9)):  # the second is zero-padded to 8x10
        assert count_flops(_OnMap(m), (64, *hw)).macs == m.macs(hw)
    assert count_flops(_OnMap(m), (64, 8, 8), batch_size=3).macs == 3 * m.macs((8, 8))


def test_msa_and_dtm_counts() -> None:
    n, c = 36, 32
    msa = MultiHeadSelfAttention(c, 4)
    assert count_flops(_OnMap(msa), (c, 6, 6)).macs == n * c * 3 * c + 2 * n * n * c + n * c * c
    # deformable conv counted like the 2x2/s2 conv it generalises, on both paths
    expected = 9 * (16 * 4 * 32 + 16 * 4 * 8)  # GEMM + offset conv, per output position
    for path in ("fast", "torchvision"):
        dtm = DeformableTokenMerging(16, 32, path=path)  # type: ignore[arg-type]
        with torch.no_grad():
            dtm.dconv.conv_offset.weight.normal_()
        assert count_flops(_OnMap(dtm), (16, 6, 6)).macs == expected
