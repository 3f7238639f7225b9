"""EcoFormer attention maths: both forms vs explicit O(N²) Hamming-affinity references, STE,
autocast, and the bit-packed popcount path (torch, Triton interpreter, CUDA)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ev_compress.ecoformer import (
    EcoAttention,
    code_matmul,
    eco_attention,
    hamming_distance,
    pack_codes,
    packed_eco_attention,
    popcount32,
    sign_ste,
    unpack_codes,
)
from ev_testing import assert_close


def _codes(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, shape, generator=g).double() * 2 - 1


def _reference(codes: torch.Tensor, v: torch.Tensor, form: str) -> torch.Tensor:
    """Explicit O(N²) attention with Hamming affinities w_ij = 2b + 1 − 2·ham(i, j) (float64)."""
    b = codes.shape[-1]
    ham = (codes.unsqueeze(-2) != codes.unsqueeze(-3)).sum(-1).double()  # [B, h, N, N]
    w = 2 * b + 1 - 2 * ham
    assert (w >= 1).all()
    den = w.sum(-1, keepdim=True)
    if form == "sum":
        return (w @ v) / den
    c = b + 1
    return ((w - c) @ v + c * v) / den


@pytest.mark.parametrize("form", ["sum", "token"])
@pytest.mark.parametrize("shape", [(2, 3, 37, 16, 8), (1, 1, 5, 3, 4)])
def test_forms_match_explicit_hamming_reference(form: str, shape: tuple[int, ...]) -> None:
    B, h, N, b, d = shape
    codes = _codes(B, h, N, b)
    v = torch.randn(B, h, N, d, dtype=torch.float64)
    out = eco_attention(codes, v, form)
    assert out.dtype == torch.float64
    assert_close(out, _reference(codes, v, form))


def test_sum_form_is_a_convex_combination_and_token_form_is_not() -> None:
    codes = _codes(1, 1, 20, 8)
    ones = torch.ones(1, 1, 20, 3, dtype=torch.float64)
    assert_close(eco_attention(codes, ones, "sum"), ones)  # weights sum to 1
    token = eco_attention(codes, ones, "token")
    assert (token < 1 - 1e-6).all()  # c·v_i instead of c·Σv: weights sum to < 1 (SYSTEMS §2.2)


def test_gradients_of_code_product_and_attention() -> None:
    codes = _codes(1, 2, 6, 4).requires_grad_()
    x = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        code_matmul,
        (
            codes.detach().transpose(-2, -1).clone().requires_grad_(),
            torch.randn(1, 2, 6, 3, dtype=torch.float64, requires_grad=True),
        ),
    )
    assert torch.autograd.gradcheck(code_matmul, (codes, x))
    v = torch.randn(1, 2, 6, 3, dtype=torch.float64, requires_grad=True)
    for form in ("sum", "token"):
        assert torch.autograd.gradcheck(lambda c, vv, f=form: eco_attention(c, vv, f), (codes, v))


def test_sign_ste_values_and_clipped_gradient() -> None:
    z = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0, 3.0], requires_grad=True)
    y = sign_ste(z)
    assert y.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]
    y.backward(torch.arange(1.0, 7.0))
    assert z.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0, 0.0]  # passed only where |z| < 1


def _fitted_attention(
    dim: int = 32, heads: int = 2, form: str = "sum", n: int = 64
) -> tuple[EcoAttention, torch.Tensor]:
    torch.manual_seed(0)
    attn = EcoAttention(dim, heads, bits=8, num_anchors=10, topk=4, form=form)  # type: ignore[arg-type]
    x = torch.randn(2, n, dim)
    attn.fit(x, iterations=5)
    return attn, x


@pytest.mark.parametrize("form", ["sum", "token"])
def test_module_forward_matches_reference_from_its_codes(form: str) -> None:
    attn, x = _fitted_attention(form=form)
    out = attn(x, 8, 8)
    codes = attn.codes(x).double()
    v = attn._heads(attn.v(x)).double()
    ref = _reference(codes, v, form).transpose(1, 2).reshape(x.shape)
    assert_close(out, attn.proj(ref.float()))
    assert torch.equal(attn(x, (8, 8)), out)  # (H, W) / feat_size calling conventions
    with pytest.raises(ValueError, match="tokens for a 5x5 map"):
        attn(x, 5, 5)


def test_autocast_bf16_keeps_fp32_normaliser() -> None:
    attn, x = _fitted_attention()
    ref = attn(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert_close(out, ref, rtol=5e-2, atol=5e-2)
    # the normaliser itself: fp32 even for bf16 values
    codes = _codes(1, 1, 1024, 16).float()
    v = torch.randn(1, 1, 1024, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = eco_attention(codes, v, "sum")
    assert_close(out, _reference(codes.double(), v.double(), "sum"))


def test_training_gradients_reach_qk_through_the_ste() -> None:
    attn, x = _fitted_attention()
    attn.train()
    attn(x).square().sum().backward()
    assert attn.qk.weight.grad is not None and attn.qk.weight.grad.abs().sum() > 0
    assert attn.v.weight.grad.abs().sum() > 0
    assert all(not b.requires_grad for b in attn.hash.buffers())


# --- bit-packed path ------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [5, 16, 32, 40])
def test_pack_unpack_popcount_hamming(bits: int) -> None:
    codes = _codes(2, 3, 11, bits).float()
    packed = pack_codes(codes)
    assert packed.dtype == torch.int32 and packed.shape == (2, 3, 11, -(-bits // 32))
    assert torch.equal(unpack_codes(packed, bits), codes)
    ham = hamming_distance(packed, packed)
    ref = (codes.unsqueeze(-2) != codes.unsqueeze(-3)).sum(-1)
    assert torch.equal(ham, ref)
    words = torch.randint(-(2**31), 2**31 - 1, (1000,), dtype=torch.int64).to(torch.int32)
    expected = torch.tensor([bin(int(w) & 0xFFFFFFFF).count("1") for w in words])
    assert torch.equal(popcount32(words), expected)


@pytest.mark.parametrize("form", ["sum", "token"])
@pytest.mark.parametrize("bits", [16, 40])
def test_packed_equals_float_path(form: str, bits: int) -> None:
    codes = _codes(2, 2, 700, bits)  # > one 512-row chunk
    v = torch.randn(2, 2, 700, 12, dtype=torch.float64)
    out = packed_eco_attention(pack_codes(codes), v, bits, form)  # type: ignore[arg-type]
    assert_close(out, eco_attention(codes, v, form))  # type: ignore[arg-type]


def test_module_packed_forward_equals_float_forward() -> None:
    for form in ("sum", "token"):
        attn, x = _fitted_attention(form=form)
        assert_close(attn.forward_packed(x), attn(x))


def test_packed_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="int32"):
        packed_eco_attention(
            torch.zeros(1, 1, 4, 1, dtype=torch.int64), torch.zeros(1, 1, 4, 2), 16
        )
    with pytest.raises(ValueError, match="form"):
        packed_eco_attention(
            torch.zeros(1, 1, 4, 1, dtype=torch.int32), torch.zeros(1, 1, 4, 2), 16, "x"
        )  # type: ignore[arg-type]


_TRITON_SCRIPT = textwrap.dedent(
    """
    import torch
    from ev_compress.ecoformer import eco_attention, pack_codes
    from ev_compress.ecoformer._triton import packed_attention_triton
    torch.manual_seed(0)
    for bits, n, d, form in ((16, 45, 12, "sum"), (40, 33, 8, "token")):  # partial blocks
        codes = torch.randint(0, 2, (1, 1, n, bits)).float() * 2 - 1
        v = torch.randn(1, 1, n, d)
        out = packed_attention_triton(pack_codes(codes), v, bits, form)
        ref = eco_attention(codes.double(), v.double(), form).float()
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    print("ok")
    """
)


@pytest.mark.slow
def test_triton_kernel_in_interpreter() -> None:
    """The CUDA kernel's logic, run by Triton's interpreter on the CPU (no GPU needed)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["sum", "token"])
def test_triton_packed_equals_float_path_cuda(form: str) -> None:
    pytest.importorskip("triton")
    codes = _codes(2, 3, 1000, 16).float().cuda()
    v = torch.randn(2, 3, 1000, 32, device="cuda")
    out = packed_eco_attention(pack_codes(codes), v, 16, form)  # type: ignore[arg-type]
    ref = eco_attention(codes.double(), v.double(), form)  # type: ignore[arg-type]
    assert_close(out, ref)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out_bf16 = packed_eco_attention(pack_codes(codes), v.bfloat16(), 16, form)  # type: ignore[arg-type]
    assert_close(out_bf16, ref)
