"""HiLo attention against explicit reference maths written here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ev_core.layers.attention import MultiHeadSelfAttention
from ev_core.layers.hilo import HiLo, hilo_macs
from ev_testing import BaseTester, assert_close
from ev_testing.reference import naive_attention


def reference_hilo(m: HiLo, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Textbook HiLo: pad, per-window Hi-Fi attention, pooled Lo-Fi attention, concat, crop."""
    B, N, C = x.shape
    H, W = hw
    s, d = m.ws, m.head_dim
    Hp, Wp = -(-H // s) * s, -(-W // s) * s
    img = torch.zeros(B, Hp, Wp, C, dtype=x.dtype)
    img[:, :H, :W] = x.reshape(B, H, W, C)
    parts = []
    if m.h_heads > 0:
        hi = torch.zeros(B, Hp, Wp, m.h_dim, dtype=x.dtype)
        for gy in range(0, Hp, s):
            for gx in range(0, Wp, s):
                win = img[:, gy : gy + s, gx : gx + s].reshape(B, s * s, C)
                q, k, v = F.linear(win, m.h_qkv.weight, m.h_qkv.bias).chunk(3, dim=-1)
                q, k, v = (t.reshape(B, s * s, m.h_heads, d).transpose(1, 2) for t in (q, k, v))
                o = naive_attention(q, k, v, scale=m.scale).transpose(1, 2).reshape(B, s, s, -1)
                hi[:, gy : gy + s, gx : gx + s] = o
        parts.append(F.linear(hi, m.h_proj.weight, m.h_proj.bias))
    if m.l_heads > 0:
        pooled = F.avg_pool2d(img.permute(0, 3, 1, 2), s).flatten(2).transpose(1, 2)
        q = F.linear(img.reshape(B, Hp * Wp, C), m.l_q.weight, m.l_q.bias)
        k, v = F.linear(pooled, m.l_kv.weight, m.l_kv.bias).chunk(2, dim=-1)
        q, k, v = (t.reshape(B, -1, m.l_heads, d).transpose(1, 2) for t in (q, k, v))
        o = naive_attention(q, k, v, scale=m.scale).transpose(1, 2).reshape(B, Hp, Wp, -1)
        parts.append(F.linear(o, m.l_proj.weight, m.l_proj.bias))
    return torch.cat(parts, dim=-1)[:, :H, :W].reshape(B, N, C)


def _layer(dim: int = 32, heads: int = 4, ws: int = 2, alpha: float = 0.5, **kw: object) -> HiLo:
    torch.manual_seed(0)
    return HiLo(dim, heads, qkv_bias=True, window_size=ws, alpha=alpha, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("hw", "ws", "alpha"), [((6, 8), 2, 0.5), ((7, 5), 2, 0.75), ((9, 10), 3, 0.25)]
)
def test_matches_reference(dtype: torch.dtype, hw: tuple[int, int], ws: int, alpha: float) -> None:
    m = _layer(ws=ws, alpha=alpha).double()
    x = torch.randn(2, hw[0] * hw[1], 32, dtype=torch.float64)
    expected = reference_hilo(m, x, hw)
    out = m.to(dtype)(x.to(dtype), hw)
    assert out.dtype == dtype
    if dtype == torch.bfloat16:
        assert_close(out, expected, atol=3e-2, rtol=3e-2)
    else:
        assert_close(out, expected)


def test_head_split_and_names() -> None:
    m = HiLo(384, 12, window_size=2, alpha=0.9)
    assert (m.l_heads, m.h_heads) == (10, 2)  # int(12 * 0.9) = 10
    assert HiLo(384, 12, alpha=0.7).l_heads == 8 and HiLo(384, 12, alpha=0.2).l_heads == 2
    assert {n.split(".")[0] for n, _ in m.named_parameters()} == {
        "h_qkv", "h_proj", "l_q", "l_kv", "l_proj"
    }  # fmt: skip
    ws1 = HiLo(64, 4, window_size=1, alpha=0.5)
    assert (ws1.l_heads, ws1.h_heads) == (4, 0)
    assert ws1.h_qkv is None and {n.split(".")[0] for n, _ in ws1.named_parameters()} == {
        "l_q", "l_kv", "l_proj"
    }  # fmt: skip


def test_alpha_zero_is_window_attention() -> None:
    m = _layer(alpha=0.0).double()
    assert m.l_heads == 0
    x = torch.randn(2, 6 * 4, 32, dtype=torch.float64)
    # window attention via a block-diagonal mask over the full map
    qkv = F.linear(x, m.h_qkv.weight, m.h_qkv.bias).reshape(2, 24, 3, 4, 8).permute(2, 0, 3, 1, 4)
    ys, xs = torch.meshgrid(torch.arange(6), torch.arange(4), indexing="ij")
    win = (ys // 2 * 2 + xs // 2).flatten()
    mask = win[:, None] == win[None, :]
    o = naive_attention(qkv[0], qkv[1], qkv[2], mask=mask).transpose(1, 2).reshape(2, 24, 32)
    assert_close(m(x, (6, 4)), F.linear(o, m.h_proj.weight, m.h_proj.bias))


def test_window_one_is_msa() -> None:
    m = _layer(ws=1, alpha=0.3).double()
    msa = MultiHeadSelfAttention(32, 4, qkv_bias=True).double()
    with torch.no_grad():
        msa.qkv.weight.copy_(torch.cat([m.l_q.weight, m.l_kv.weight]))
        msa.qkv.bias.copy_(torch.cat([m.l_q.bias, m.l_kv.bias]))
        msa.proj.load_state_dict(m.l_proj.state_dict())
    x = torch.randn(2, 5 * 7, 32, dtype=torch.float64)
    assert_close(m(x, (5, 7)), msa(x, (5, 7)))


def test_padding_is_zero_pad_then_crop() -> None:
    m = _layer().double()
    x = torch.randn(2, 5 * 7, 32, dtype=torch.float64)
    padded = torch.zeros(2, 6, 8, 32, dtype=torch.float64)
    padded[:, :5, :7] = x.reshape(2, 5, 7, 32)
    full = m(padded.reshape(2, 48, 32), (6, 8)).reshape(2, 6, 8, 32)
    assert_close(m(x, (5, 7)), full[:, :5, :7].reshape(2, 35, 32))


def test_fused_equals_unfused() -> None:
    fused = _layer(backend="sdpa")
    unfused = _layer(backend="math")
    x = torch.randn(2, 6 * 6, 32)
    assert_close(fused(x, (6, 6)), unfused(x, (6, 6)))


def test_gradcheck() -> None:
    m = HiLo(8, 2, qkv_bias=True, window_size=2, alpha=0.5).double()
    x = torch.randn(1, 3 * 4, 8, dtype=torch.float64)
    assert BaseTester.gradcheck(lambda t: m(t, (3, 4)), (x,))


def test_macs_formula() -> None:
    assert hilo_macs(384, 12, (14, 14), window_size=2, alpha=0.5) == 83_467_776
    # ws = 1: plain MSA (qkv + 2·N²·C + proj)
    n, c = 49, 96
    assert hilo_macs(c, 3, (7, 7), window_size=1) == n * c * 3 * c + 2 * n * n * c + n * c * c


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="tokens"):
        _layer()(torch.randn(1, 10, 32), (3, 4))
    with pytest.raises(ValueError, match="divisible"):
        HiLo(30, 4)
