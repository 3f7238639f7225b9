"""count_energy against hand-counted small cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ev_compress.ecoformer import eco_attention
from ev_compress.energy import ADD_PJ, MUL_PJ, count_energy


def test_linear_with_bias() -> None:
    # [2, 4] @ [4, 3]: 2·3·4 = 24 MACs; + 6 bias adds
    r = count_energy(nn.Linear(4, 3), torch.randn(2, 4))
    assert (r.mul, r.add, r.other) == (24, 30, 0)
    assert r.picojoules == pytest.approx(24 * MUL_PJ + 30 * ADD_PJ)
    r = count_energy(nn.Linear(4, 3, bias=False), torch.randn(5, 2, 4))
    assert (r.mul, r.add) == (120, 120)


def test_conv_and_depthwise_conv() -> None:
    # 3x3 conv 2→3 channels, padding 1 on 5x5: 75 outputs · 2·9 MACs, + 75 bias adds
    r = count_energy(nn.Conv2d(2, 3, 3, padding=1), torch.randn(1, 2, 5, 5))
    assert (r.mul, r.add) == (1350, 1425)
    # depth-wise 3x3 on 4 channels, 4x4 map, no bias: 64 outputs · 9 MACs
    r = count_energy(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False), torch.randn(1, 4, 4, 4))
    assert (r.mul, r.add) == (576, 576)


def test_layer_norm_softmax_gelu() -> None:
    r = count_energy(nn.LayerNorm(4), torch.randn(2, 4))  # 8 elements: 3 mul, 4 add; 2 rsqrt
    assert (r.mul, r.add, r.other) == (24, 32, 2)
    r = count_energy(nn.Softmax(dim=-1), torch.randn(3, 5))  # 15 elements: 1 mul, 2 add, 1 exp
    assert (r.mul, r.add, r.other) == (15, 30, 15)
    r = count_energy(nn.GELU(), torch.randn(10))
    assert (r.mul, r.add, r.other) == (30, 10, 10)
    r = count_energy(nn.ReLU(), torch.randn(10))  # comparisons are free
    assert (r.mul, r.add, r.other) == (0, 0, 0)


def test_binary_code_products_are_additions() -> None:
    """B=h=1, N=4 tokens, b=2 bits, d=3, sum form, counted by hand:

    context Hᵀv: 2·3 outputs · 4 = 24 add; H·context: 4·3 · 2 = 24 add; Σ_j v_j: 12 − 3 = 9 add;
    c·Σv: 3 mul; + (broadcast to 4x3): 12 add; Σ_j H_j: 8 − 2 = 6 add; H·ΣH: 4 · 2 = 8 add;
    + N·c: 4 add; division: 12 mul. Total 87 add, 15 mul.
    """

    class Attn(nn.Module):
        def forward(self, codes: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return eco_attention(codes, v, "sum")

    codes = torch.tensor([[1.0, -1], [1, 1], [-1, 1], [-1, -1]]).view(1, 1, 4, 2)
    r = count_energy(Attn(), (codes, torch.randn(1, 1, 4, 3)))
    assert (r.mul, r.add, r.other) == (15, 87, 0)
    assert not r.uncounted
    # the same products as float matmuls would be 24 + 24 + 8 = 56 multiplications more
    plain = count_energy(nn.Linear(2, 3, bias=False), torch.randn(4, 2))
    assert plain.mul == 24


def test_sdpa_counted_like_explicit_attention() -> None:
    class Sdpa(nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    r = count_energy(Sdpa(), (q, k, v))  # the fused CPU kernel (one ATen op)
    logits = 2 * 5 * 6
    # q·kᵀ and p·v: logits·4 MACs each; scale: logits mul; softmax: 1 mul + 2 add + 1 exp
    assert (r.mul, r.add, r.other) == (logits * 8 + 2 * logits, logits * 8 + 2 * logits, logits)
    # v with another width: PyTorch runs the math path (scale applied to q and to k, bmm,
    # softmax, bmm), counted op by op: 40 + 48 scale muls instead of 60
    r = count_energy(Sdpa(), (q, k, torch.randn(1, 2, 6, 3)))
    assert (r.mul, r.add, r.other) == (
        logits * 7 + 40 + 48 + logits,
        logits * 7 + 2 * logits,
        logits,
    )
    assert not r.uncounted


def test_per_layer_rows_and_uncounted_ops() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    r = count_energy(model, torch.randn(3, 4))
    rows = {row.name: row for row in r.layers}
    assert (rows["0"].mul, rows["0"].add) == (96, 120)
    assert (rows["2"].mul, rows["2"].add) == (48, 54)
    assert rows["0"].type == "Linear"
    assert r.mul == 144 and r.add == 174
    table = r.table()
    assert "| 0 | Linear | 96 | 120 |" in table and "**total**" in table
    assert r.to_dict()["picojoules"] == pytest.approx(r.picojoules)

    class Fft(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.fft.rfft(x).abs()

    r = count_energy(Fft(), torch.randn(8))
    assert any("fft" in name for name in r.uncounted)  # nothing is dropped silently


def test_residual_adds_attributed_to_the_parent() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc(x)

    r = count_energy(nn.Sequential(Block()), torch.randn(2, 4))
    rows = {row.name: row for row in r.layers}
    assert (rows["0.fc"].mul, rows["0.fc"].add) == (32, 32)
    assert (rows["0"].mul, rows["0"].add) == (0, 8)


def test_weighted_embedding_bag_and_warmup() -> None:
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = torch.randn(5, 4)
            self.calls = 0

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 1:  # one-off work, e.g. autotuning: not part of a forward's cost
                self.table @ self.table.T
            w = torch.ones(idx.numel())
            return nn.functional.embedding_bag(
                idx, self.table, torch.tensor([0, 3]), mode="sum", per_sample_weights=w
            )

    # 6 gathered rows of 4 values, each weighted and summed: 24 MACs
    r = count_energy(Bag(), torch.tensor([0, 1, 2, 2, 3, 4]))
    assert (r.mul, r.add) == (24, 24) and not r.uncounted
    r = count_energy(Bag(), torch.tensor([0, 1, 2, 2, 3, 4]), warmup=False)
    assert (r.mul, r.add) == (24 + 100, 24 + 100)
