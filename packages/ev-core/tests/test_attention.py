"""Attention family: the backend dispatcher, MSA, (shifted, padded) window attention and
spatial-reduction attention against explicit float64 references written here."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from ev_core.layers.attention import (
    ATTENTION_BACKENDS,
    AttentionBackendError,
    MultiHeadSelfAttention,
    attend,
    attention_backend,
    backend_support,
    get_attention_backend,
    resolve_backend,
    select_backend,
    settle_backend,
)
from ev_core.layers.sra import SpatialReductionAttention
from ev_core.layers.window import WindowAttention, window_partition, window_reverse
from ev_testing import BaseTester, assert_close
from ev_testing.reference import naive_attention

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """Every shape here is tiny: intra-op threads only add overhead (and noise on busy CI)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


CPU_BACKENDS = ["sdpa", "math", "sdpa_flash", "sdpa_math"]


# ----------------------------------------------------------------------------- references
def lin(x: Tensor, layer: nn.Linear) -> Tensor:
    """``x·Wᵀ + b`` in float64."""
    out = x.double() @ layer.weight.double().T
    return out + layer.bias.double() if layer.bias is not None else out


def heads(t: Tensor, h: int) -> Tensor:
    """``[B, N, h·d] -> [B, h, N, d]``."""
    B, N, C = t.shape
    return t.view(B, N, h, C // h).transpose(1, 2)


def merge(t: Tensor) -> Tensor:
    """``[B, h, N, d] -> [B, N, h·d]``."""
    B, h, N, d = t.shape
    return t.transpose(1, 2).reshape(B, N, h * d)


def ref_msa(x: Tensor, mod: MultiHeadSelfAttention) -> Tensor:
    h = mod.num_heads
    q, k, v = (heads(t, h) for t in lin(x, mod.qkv).chunk(3, dim=-1))
    return lin(merge(naive_attention(q, k, v, scale=mod.scale)), mod.proj)


def ref_window(x: Tensor, mod: WindowAttention, H: int, W: int) -> Tensor:
    """Full attention over the map under a block-diagonal mask built from the shifted window
    grid: tokens (r, c), (r', c') attend iff floor((r−sh)/Mh) and floor((c−sw)/Mw) agree.
    Without ``mask_padding`` the zero-padded tokens take part (as in Swin) and are cropped."""
    (wh, ww), (sh, sw), h = mod.window_size, mod.shift_size, mod.num_heads
    B, N, C = x.shape
    Hg, Wg = H, W
    tokens = x.double()
    if not mod.mask_padding:
        Hg, Wg = -(-H // wh) * wh, -(-W // ww) * ww
        grid = torch.zeros(B, Hg, Wg, C, dtype=torch.float64)
        grid[:, :H, :W] = x.double().view(B, H, W, C)
        tokens = grid.reshape(B, Hg * Wg, C)
    r = torch.arange(Hg).repeat_interleave(Wg)
    c = torch.arange(Wg).repeat(Hg)
    gr, gc = (
        torch.div(r - sh, wh, rounding_mode="floor"),
        torch.div(c - sw, ww, rounding_mode="floor"),
    )
    mask = (gr[:, None] == gr[None]) & (gc[:, None] == gc[None])
    bias = None
    if mod.relative_position_bias_table is not None:
        dr, dc = r[:, None] - r[None], c[:, None] - c[None]
        idx = torch.where(mask, (dr + wh - 1) * (2 * ww - 1) + (dc + ww - 1), 0)
        bias = mod.relative_position_bias_table.double()[idx].permute(2, 0, 1)
    q, k, v = (heads(t, h) for t in lin(tokens, mod.qkv).chunk(3, dim=-1))
    out = merge(naive_attention(q, k, v, scale=mod.scale, bias=bias, mask=mask))
    if not mod.mask_padding:
        out = out.view(B, Hg, Wg, C)[:, :H, :W].reshape(B, N, C)
    return lin(out, mod.proj)


def ref_window_loop(x: Tensor, mod: WindowAttention, H: int, W: int) -> Tensor:
    """Unshifted window attention on a divisible map, one window at a time (no padding)."""
    (wh, ww), h = mod.window_size, mod.num_heads
    B, N, C = x.shape
    qkv = lin(x, mod.qkv).view(B, H, W, 3 * C)
    out = torch.zeros(B, H, W, C, dtype=torch.float64)
    for i in range(0, H, wh):
        for j in range(0, W, ww):
            win = qkv[:, i : i + wh, j : j + ww].reshape(B, wh * ww, 3 * C)
            q, k, v = (heads(t, h) for t in win.chunk(3, dim=-1))
            o = merge(naive_attention(q, k, v, scale=mod.scale))
            out[:, i : i + wh, j : j + ww] = o.view(B, wh, ww, C)
    return lin(out.view(B, N, C), mod.proj)


def ref_layernorm(t: Tensor, ln: nn.LayerNorm) -> Tensor:
    mu = t.mean(-1, keepdim=True)
    var = ((t - mu) ** 2).mean(-1, keepdim=True)
    return (t - mu) / torch.sqrt(var + ln.eps) * ln.weight.double() + ln.bias.double()


def ref_sra(x: Tensor, mod: SpatialReductionAttention, H: int, W: int) -> Tensor:
    B, _, C = x.shape
    h = mod.num_heads
    m = x.double().view(B, H, W, C)
    if mod.linear:
        assert mod.sr is not None and mod.norm is not None
        P = 7
        pooled = torch.zeros(B, P, P, C, dtype=torch.float64)
        for i in range(P):  # adaptive pooling bins [floor(i·H/P), ceil((i+1)·H/P))
            r0, r1 = (i * H) // P, -(-((i + 1) * H) // P)
            for j in range(P):
                c0, c1 = (j * W) // P, -(-((j + 1) * W) // P)
                pooled[:, i, j] = m[:, r0:r1, c0:c1].mean(dim=(1, 2))
        red = pooled.view(B, P * P, C) @ mod.sr.weight.double()[:, :, 0, 0].T
        red = ref_layernorm(red + mod.sr.bias.double(), mod.norm)
        kv_in = 0.5 * red * (1 + torch.erf(red / math.sqrt(2.0)))
    elif mod.sr is not None:
        assert mod.norm is not None
        s = mod.sr_ratio
        Hr, Wr = H // s, W // s  # strided conv drops the remainder rows/cols
        patches = m[:, : Hr * s, : Wr * s].reshape(B, Hr, s, Wr, s, C)
        red = torch.einsum("bisjtc,ocst->bijo", patches, mod.sr.weight.double())
        red = red.reshape(B, Hr * Wr, C) + mod.sr.bias.double()
        kv_in = ref_layernorm(red, mod.norm)
    else:
        kv_in = x.double()
    q = heads(lin(x, mod.q), h)
    k, v = (heads(t, h) for t in lin(kv_in, mod.kv).chunk(2, dim=-1))
    return lin(merge(naive_attention(q, k, v, scale=mod.scale)), mod.proj)


def _tokens(B: int, H: int, W: int, C: int, dtype: torch.dtype) -> Tensor:
    return torch.randn(B, H * W, C, dtype=torch.float64).to(dtype)


def _randomize(mod: nn.Module) -> nn.Module:
    """Non-trivial values for every parameter (zero-init biases would hide bugs)."""
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.5))
    return mod


# bf16 runs three GEMMs (qkv, attention, proj) with bf16 roundings in between
BF16_TOL = {"rtol": 3e-2, "atol": 4e-2}


def _check(actual: Tensor, expected: Tensor) -> None:
    kw = BF16_TOL if actual.dtype == torch.bfloat16 else {}
    assert_close(actual, expected, **kw)


# ----------------------------------------------------------------------------- dispatcher
class TestAttend(BaseTester):
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("backend", CPU_BACKENDS)
    @pytest.mark.parametrize("bias_kind", ["none", "float", "bool"])
    def test_matches_naive(self, backend: str, dtype: torch.dtype, bias_kind: str) -> None:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for n in (5, 7, 7))
        bias, mask = None, None
        if bias_kind == "float":
            bias = torch.randn(1, 3, 5, 7, generator=g, dtype=torch.float64)
        elif bias_kind == "bool":
            mask = torch.rand(5, 7, generator=g) > 0.4
            mask[:, 0] = True  # every query keeps a key
        expected = naive_attention(q, k, v, scale=0.3, bias=bias, mask=mask)
        arg = mask if mask is not None else (bias.to(dtype) if bias is not None else None)
        out = attend(q.to(dtype), k.to(dtype), v.to(dtype), bias=arg, scale=0.3, backend=backend)
        assert out.dtype == dtype
        tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
        assert_close(out, expected, **tol)

    def test_value_dim_may_differ(self) -> None:
        q, k = torch.randn(1, 2, 4, 8, dtype=torch.float64), torch.randn(1, 2, 6, 8).double()
        v = torch.randn(1, 2, 6, 3, dtype=torch.float64)
        for backend in ("sdpa", "math"):
            assert_close(attend(q, k, v, backend=backend), naive_attention(q, k, v))
        reasons = backend_support(q, k, v)["sdpa_flash"]
        assert any("value head dim" in r for r in reasons)

    @pytest.mark.parametrize("backend", ["sdpa", "math"])
    def test_gradcheck(self, backend: str) -> None:
        q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
        bias = torch.randn(2, 3, 5)
        assert self.gradcheck(
            lambda q, k, v, b: attend(q, k, v, bias=b, backend=backend), [q, k, v, bias]
        )

    @pytest.mark.parametrize(
        ("case", "kwargs"),
        [
            ("plain", {}),
            ("float bias 4d", {"bias": torch.randn(1, 3, 5, 7)}),
            ("float bias 3d", {"bias": torch.randn(3, 5, 7)}),
            ("bool mask 2d", {"bias": torch.ones(5, 7, dtype=torch.bool)}),
            ("dropout", {"dropout_p": 0.2}),
            ("bf16", {"dtype": torch.bfloat16}),
            ("value dim", {"dv": 4}),
            ("non-contiguous q", {"transpose_q": True}),
            ("3-d inputs", {"three_d": True}),
            ("5-d inputs", {"five_d": True}),
            ("3-d inputs, 2-d mask", {"three_d": True, "bias": torch.randn(5, 7)}),
        ],
    )
    def test_reasons_agree_with_torch(self, case: str, kwargs: dict) -> None:
        """A backend reports no reason exactly when it actually runs (CPU)."""
        dtype = kwargs.get("dtype", torch.float32)
        q = torch.randn(2, 3, 5, 8, dtype=dtype)
        if kwargs.get("transpose_q"):
            q = torch.randn(2, 3, 8, 5, dtype=dtype).transpose(-1, -2)
        k = torch.randn(2, 3, 7, 8, dtype=dtype)
        v = torch.randn(2, 3, 7, kwargs.get("dv", 8), dtype=dtype)
        if kwargs.get("three_d"):
            q, k, v = q[0], k[0], v[0]
        if kwargs.get("five_d"):
            q, k, v = q[None], k[None], v[None]
        bias, p = kwargs.get("bias"), kwargs.get("dropout_p", 0.0)
        for name, reasons in backend_support(q, k, v, bias=bias, dropout_p=p).items():
            try:
                ATTENTION_BACKENDS[name](q, k, v, bias, None, p)
                ran = True
            except RuntimeError:
                ran = False
            assert ran == (not reasons), (case, name, reasons)

    @pytest.mark.gpu
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("with_bias", [False, True])
    @pytest.mark.parametrize("head_dim", [64, 320])
    def test_reasons_agree_with_torch_cuda(
        self, dtype: torch.dtype, with_bias: bool, head_dim: int
    ) -> None:
        q, k, v = (torch.randn(2, 4, 16, head_dim, device="cuda", dtype=dtype) for _ in range(3))
        bias = torch.randn(1, 4, 16, 16, device="cuda", dtype=dtype) if with_bias else None
        support = backend_support(q, k, v, bias=bias)
        if dtype == torch.float32:
            assert any("float16/bfloat16" in r for r in support["sdpa_flash"])
        if with_bias:
            assert any("bias" in r for r in support["sdpa_flash"])
        for name, reasons in support.items():
            try:
                out = ATTENTION_BACKENDS[name](q, k, v, bias, None, 0.0)
                ran = True
            except RuntimeError:
                ran = False
            assert ran == (not reasons), (name, reasons)
            if ran:
                expected = naive_attention(q.double(), k.double(), v.double(), bias=bias)
                assert_close(
                    out,
                    expected,
                    **(
                        {"rtol": 2e-2, "atol": 2e-2}
                        if dtype == torch.bfloat16
                        else {"rtol": 1e-3, "atol": 1e-3}
                    ),
                )

    def test_explicit_backend_error_lists_every_reason(self) -> None:
        q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
        with pytest.raises(AttentionBackendError) as err:
            attend(q, k, v, dropout_p=0.1, backend="sdpa_flash")
        msg = str(err.value)
        for name in ATTENTION_BACKENDS:
            assert f"`{name}`" in msg
        assert "dropout_p > 0 is not supported by CPU flash" in msg
        assert "memory-efficient attention is CUDA-only" in msg
        assert "`math`: available" in msg
        with pytest.raises(AttentionBackendError, match="cuDNN attention is CUDA-only"):
            select_backend(q, k, v, backend="sdpa_cudnn")

    def test_auto_default_and_settled_backends(self) -> None:
        q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
        assert select_backend(q, k, v, backend="auto").name == "sdpa"
        assert settle_backend("auto") == "sdpa" and settle_backend("math") == "math"
        assert_close(attend(q, k, v, backend="sdpa"), attend(q, k, v, backend="math"))
        default = get_attention_backend()
        with attention_backend("math"):
            assert resolve_backend() == "math" and settle_backend() == "math"
            built_inside = MultiHeadSelfAttention(8, 2)
        assert get_attention_backend() == default
        # settled at construction: the module keeps "math" after the context is left
        assert built_inside.backend == "math" and MultiHeadSelfAttention(8, 2).backend == "sdpa"
        with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
            attend(q, k, v, backend="xformers")
        with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
            MultiHeadSelfAttention(8, 2, backend="xformers")

    def test_invalid_inputs(self) -> None:
        q = torch.randn(1, 2, 4, 8)
        with pytest.raises(ValueError, match="share one floating dtype"):
            attend(q, q.double(), q)
        with pytest.raises(ValueError, match="head dims differ"):
            attend(q, torch.randn(1, 2, 4, 6), q)
        with pytest.raises(ValueError, match="k, v their length"):
            attend(q, q, torch.randn(1, 2, 5, 8))
        with pytest.raises(ValueError, match="bias must be bool, float32"):
            attend(q, q, q, bias=torch.zeros(4, 4, dtype=torch.float64))
        with pytest.raises(ValueError, match="does not broadcast to the logits"):
            attend(q, q, q, bias=torch.zeros(3, 4, 4))
        with pytest.raises(ValueError, match="dropout_p"):
            attend(q, q, q, dropout_p=1.0)


# ----------------------------------------------------------------------------- MSA
class TestMultiHeadSelfAttention(BaseTester):
    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("backend", ["sdpa", "math"])
    def test_matches_reference(self, dtype: torch.dtype, backend: str) -> None:
        torch.manual_seed(0)
        mod = _randomize(MultiHeadSelfAttention(16, 4, backend=backend)).to(dtype)
        x = _tokens(2, 3, 4, 16, dtype)
        _check(mod(x, (3, 4)), ref_msa(x, mod))

    def test_fused_equals_unfused_with_bias(self) -> None:
        torch.manual_seed(1)
        mod = _randomize(MultiHeadSelfAttention(16, 2))
        x, bias = torch.randn(2, 9, 16), torch.randn(2, 9, 9)
        mod.backend = "sdpa"
        fused = mod(x, (3, 3), bias=bias)
        mod.backend = "math"
        assert_close(fused, mod(x, (3, 3), bias=bias))

    def test_gradcheck(self) -> None:
        mod = MultiHeadSelfAttention(4, 2).double()
        assert self.gradcheck(lambda x: mod(x, (2, 3)), [torch.randn(1, 6, 4)])

    def test_compile_fullgraph(self) -> None:
        torch.manual_seed(2)
        mod = MultiHeadSelfAttention(16, 4)
        x = torch.randn(2, 12, 16)
        compiled = torch.compile(mod, fullgraph=True, backend="eager")  # raises on a graph break
        assert_close(compiled(x, (3, 4)), mod(x, (3, 4)))

    def test_invalid(self) -> None:
        with pytest.raises(ValueError, match="not divisible by num_heads"):
            MultiHeadSelfAttention(10, 4)
        with pytest.raises(ValueError, match="does not match the map size"):
            MultiHeadSelfAttention(8, 2)(torch.randn(1, 10, 8), (3, 3))


# ----------------------------------------------------------------------------- windows
WINDOW_CASES = [
    # H, W, M, shift, rel_pos_bias
    (8, 8, 4, 0, False),  # divisible, plain
    (8, 8, 4, 2, True),  # Swin shifted block
    (7, 10, 4, 2, True),  # padding + shift + bias
    (5, 6, 3, 0, True),  # padding only
    (6, 9, 3, 1, False),  # divisible, odd shift
]


class TestWindowAttention(BaseTester):
    def test_partition_reverse(self) -> None:
        x = torch.randn(2, 6, 8, 3)
        win = window_partition(x, (3, 4))
        assert win.shape == (2 * 2 * 2, 3, 4, 3)
        # window (b, i, j) sits at index b·nW + i·(W/Mw) + j
        torch.testing.assert_close(win[1 * 4 + 1 * 2 + 0], x[1, 3:6, 0:4], rtol=0, atol=0)
        torch.testing.assert_close(window_reverse(win, (3, 4), 6, 8), x, rtol=0, atol=0)
        with pytest.raises(ValueError, match="not divisible"):
            window_partition(torch.randn(1, 5, 8, 3), 4)

    @pytest.mark.parametrize(("H", "W", "M", "shift", "rel"), WINDOW_CASES)
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_block_diagonal_full_attention(
        self, H: int, W: int, M: int, shift: int, rel: bool, dtype: torch.dtype
    ) -> None:
        torch.manual_seed(3)
        mod = WindowAttention(16, 2, window_size=M, shift_size=shift, rel_pos_bias=rel)
        mod = _randomize(mod).to(dtype)
        x = _tokens(2, H, W, 16, dtype)
        _check(mod(x, (H, W)), ref_window(x, mod, H, W))

    @pytest.mark.parametrize(("H", "W", "M", "shift", "rel"), WINDOW_CASES[2:4])
    def test_unmasked_padding_matches_swin(
        self, H: int, W: int, M: int, shift: int, rel: bool
    ) -> None:
        torch.manual_seed(4)
        mod = WindowAttention(
            8, 2, window_size=M, shift_size=shift, rel_pos_bias=rel, mask_padding=False
        )
        mod = _randomize(mod).double()
        x = _tokens(1, H, W, 8, torch.float64)
        out = mod(x, (H, W))
        assert_close(out, ref_window(x, mod, H, W))
        mod.mask_padding = True  # padded keys now masked: a different (padding-free) result
        assert (mod(x, (H, W)) - out).abs().max() > 1e-3

    def test_padded_equals_unpadded_when_divisible(self) -> None:
        torch.manual_seed(5)
        mod = _randomize(WindowAttention(8, 2, window_size=3)).double()
        x = _tokens(2, 6, 9, 8, torch.float64)
        expected = ref_window_loop(x, mod, 6, 9)
        assert_close(mod(x, (6, 9)), expected)
        mod.mask_padding = False
        assert_close(mod(x, (6, 9)), expected)

    @pytest.mark.parametrize("rel", [False, True])
    def test_fused_equals_unfused(self, rel: bool) -> None:
        torch.manual_seed(6)
        mod = _randomize(WindowAttention(16, 4, window_size=4, shift_size=2, rel_pos_bias=rel))
        x = torch.randn(2, 7 * 9, 16)
        mod.backend = "sdpa"
        fused = mod(x, (7, 9))
        mod.backend = "math"
        assert_close(fused, mod(x, (7, 9)))

    def test_gradcheck_shift_pad_bias(self) -> None:
        mod = WindowAttention(4, 2, window_size=2, shift_size=1, rel_pos_bias=True).double()
        table = torch.randn(9, 2)

        def fn(x: Tensor, t: Tensor) -> Tensor:
            params = {"relative_position_bias_table": t}
            return torch.func.functional_call(mod, params, (x, (3, 3)))

        assert self.gradcheck(fn, [torch.randn(1, 9, 4), table])

    def test_compile_fullgraph(self) -> None:
        torch.manual_seed(10)
        mod = WindowAttention(8, 2, window_size=3, shift_size=1, rel_pos_bias=True)
        x = torch.randn(1, 5 * 7, 8)
        compiled = torch.compile(mod, fullgraph=True, backend="eager")
        assert_close(compiled(x, (5, 7)), mod(x, (5, 7)))

    def test_default_window_and_names(self) -> None:
        mod = WindowAttention(32, 4, rel_pos_bias=True)
        assert mod.window_size == (7, 7)
        assert mod.relative_position_bias_table is not None
        assert mod.relative_position_bias_table.shape == (13 * 13, 4)
        assert set(mod.state_dict()) == {
            "qkv.weight",
            "qkv.bias",
            "proj.weight",
            "proj.bias",
            "relative_position_bias_table",
        }

    def test_invalid(self) -> None:
        with pytest.raises(ValueError, match="not divisible by num_heads"):
            WindowAttention(10, 4)
        with pytest.raises(ValueError, match="0 <= shift < window"):
            WindowAttention(8, 2, window_size=4, shift_size=4)
        with pytest.raises(ValueError, match="does not match the map size"):
            WindowAttention(8, 2)(torch.randn(1, 10, 8), (3, 4))
        with pytest.raises(ValueError, match="expected 8 channels"):
            WindowAttention(8, 2)(torch.randn(1, 12, 6), (3, 4))


# ----------------------------------------------------------------------------- SRA
SRA_CASES = [
    # H, W, sr_ratio, linear
    (8, 8, 2, False),
    (9, 10, 2, False),  # remainder row/column dropped by the strided conv
    (6, 6, 1, False),  # no reduction
    (14, 14, 1, True),  # linear: pool to 7x7
    (10, 9, 1, True),  # linear, uneven adaptive bins
]


class TestSpatialReductionAttention(BaseTester):
    @pytest.mark.parametrize(("H", "W", "sr", "linear"), SRA_CASES)
    @pytest.mark.parametrize("dtype", DTYPES)
    def test_matches_reference(
        self, H: int, W: int, sr: int, linear: bool, dtype: torch.dtype
    ) -> None:
        torch.manual_seed(7)
        mod = SpatialReductionAttention(16, 2, sr_ratio=sr, linear=linear)
        mod = _randomize(mod).to(dtype)
        x = _tokens(2, H, W, 16, dtype)
        _check(mod(x, (H, W)), ref_sra(x, mod, H, W))

    @pytest.mark.parametrize(("sr", "linear"), [(2, False), (1, False), (1, True)])
    def test_matches_timm_pvt_v2(self, sr: int, linear: bool) -> None:
        from timm.models.pvt_v2 import Attention

        torch.manual_seed(8)
        ours = _randomize(SpatialReductionAttention(32, 4, sr_ratio=sr, linear=linear)).eval()
        theirs = Attention(32, num_heads=4, sr_ratio=sr, linear_attn=linear).eval()
        theirs.load_state_dict(ours.state_dict(), strict=True)  # same names, 1:1
        assert set(theirs.state_dict()) == set(ours.state_dict())
        x = torch.randn(2, 14 * 14, 32)
        with torch.no_grad():
            assert_close(ours(x, (14, 14)), theirs(x, [14, 14]))

    def test_fused_equals_unfused(self) -> None:
        torch.manual_seed(9)
        mod = _randomize(SpatialReductionAttention(16, 4, sr_ratio=2))
        x = torch.randn(2, 64, 16)
        mod.backend = "sdpa"
        fused = mod(x, (8, 8))
        mod.backend = "math"
        assert_close(fused, mod(x, (8, 8)))

    @pytest.mark.parametrize("linear", [False, True])
    def test_gradcheck(self, linear: bool) -> None:
        mod = SpatialReductionAttention(4, 2, sr_ratio=2, linear=linear, pool_size=2).double()
        assert self.gradcheck(lambda x: mod(x, (4, 4)), [torch.randn(1, 16, 4)])

    def test_invalid(self) -> None:
        with pytest.raises(ValueError, match="not divisible by num_heads"):
            SpatialReductionAttention(10, 3)
        with pytest.raises(ValueError, match="smaller than sr_ratio"):
            SpatialReductionAttention(8, 2, sr_ratio=4)(torch.randn(1, 6, 8), (2, 3))
        with pytest.raises(ValueError, match="does not match the map size"):
            SpatialReductionAttention(8, 2)(torch.randn(1, 10, 8), (3, 3))


# ----------------------------------------------------------------------------- oneDNN inference
class TestOneDNNInferencePath:
    """The CPU inference path (gradients off) of HiLo, fp32 and bf16 autocast, against the
    module path, and the cached bf16 weight casts following parameter updates."""

    @staticmethod
    def _hilo(alpha: float = 0.5, ws: int = 2) -> nn.Module:
        from ev_core.layers.hilo import HiLo

        torch.manual_seed(3)
        return _randomize(HiLo(32, 4, qkv_bias=True, window_size=ws, alpha=alpha)).eval()

    @pytest.mark.parametrize(("alpha", "ws"), [(0.5, 2), (0.75, 2), (0.0, 2), (1.0, 2), (0.5, 1)])
    def test_hilo_fused_equals_modules(self, alpha: float, ws: int) -> None:
        from ev_core.layers.onednn import use_onednn

        mod = self._hilo(alpha, ws)
        x = torch.randn(2, 6 * 7, 32)
        ref = mod(x, (6, 7))  # gradients on: the nn.Linear modules
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref16 = mod(x, (6, 7))
        with torch.no_grad():
            assert use_onednn(x) == torch.backends.mkldnn.is_available()
            assert_close(mod(x, (6, 7)), ref)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out16 = mod(x, (6, 7))
        assert out16.dtype == ref16.dtype == torch.bfloat16
        # the same bf16 roundings as autocast's module path (GEMM accumulation order aside)
        assert_close(out16.float(), ref16.float(), **BF16_TOL)
        rel = (out16.float() - ref).norm() / ref.norm()
        assert rel < 1e-2, rel

    def test_cached_casts_follow_updates(self) -> None:
        """The cached bf16 weights are rebuilt after an in-place update, a ``load_state_dict``
        and a ``param.data =`` swap (version counter / storage change)."""
        from ev_core.layers.onednn import cast_weight, clear_weight_cache

        mod = self._hilo()
        x = torch.randn(1, 16, 32)
        twin = self._hilo()

        def check() -> None:
            twin.load_state_dict(mod.state_dict())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ref16 = twin(x, (4, 4))  # module path: autocast casts afresh
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                assert_close(mod(x, (4, 4)).float(), ref16.float(), **BF16_TOL)

        check()
        with torch.no_grad():
            mod.l_q.weight.mul_(-2.0)  # in place: bumps the version counter
            mod.h_qkv.bias.add_(1.0)
        check()
        mod.load_state_dict(self._hilo().state_dict() | {"l_kv.bias": torch.ones(32)})
        check()
        mod.h_qkv.weight.data = torch.randn_like(mod.h_qkv.weight)  # new storage
        check()
        w = mod.l_q.weight
        a = cast_weight(w, torch.bfloat16)
        assert a is not None and a.dtype == torch.bfloat16 and not a.requires_grad
        assert a is cast_weight(w, torch.bfloat16)  # cached
        assert cast_weight(w, torch.float32) is w and cast_weight(None, w.dtype) is None
        clear_weight_cache()
        assert a is not cast_weight(w, torch.bfloat16)

    def test_hilo_default_backend_runs_tiny_hifi_windows_by_maths(self) -> None:
        """With the default backend, Hi-Fi windows of <= 16 tokens use explicit maths on the CPU
        (same numbers as SDPA); a named backend is used as given."""
        from ev_core.layers.hilo import HiLo

        assert HiLo(32, 4, window_size=2).hifi_math and HiLo(32, 4, window_size=4).hifi_math
        assert not HiLo(32, 4, window_size=5).hifi_math
        assert not HiLo(32, 4, window_size=2, backend="sdpa").hifi_math
        default = self._hilo()
        sdpa = self._hilo()
        sdpa.backend, sdpa.hifi_math = "sdpa", False
        x = torch.randn(2, 6 * 8, 32)
        assert_close(default(x, (6, 8)), sdpa(x, (6, 8)))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert_close(default(x, (6, 8)).float(), sdpa(x, (6, 8)).float(), **BF16_TOL)
