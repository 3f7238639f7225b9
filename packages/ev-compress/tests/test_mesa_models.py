"""Mesa on whole timm/ev models: exact forward, saved bytes, gradients, training, state, revert."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ev_compress import mesa


def tiny_vit(**kwargs: object) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        img_size=32,
        patch_size=8,
        depth=2,
        num_classes=10,
        **kwargs,
    )


def saved_bytes(model: nn.Module, x: Tensor) -> tuple[Tensor, int]:
    """Forward with a saved-tensor hook counting distinct non-parameter storages."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return out, sum(storages.values())


def flat_grad(model: nn.Module) -> Tensor:
    """All parameter gradients as one float64 vector (cosines of large tensors in float64:
    fp32 ``cosine_similarity`` over millions of elements can exceed 1)."""
    return torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])


def cos64(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def assert_grads_close(ref: nn.Module, conv: nn.Module) -> None:
    """Whole-gradient cosine >= 0.995; every parameter tensor >= 0.95 (float64 cosines).
    Tensors whose reference gradient is a negligible share of the whole (< 1e-4 of its norm: a
    bias cancelled by a following batch norm, theoretically zero) have no meaningful direction;
    they are only required to stay negligible."""
    g_ref, g_mesa = flat_grad(ref), flat_grad(conv)
    assert cos64(g_ref, g_mesa) >= 0.995
    total = g_ref.norm()
    for (name, p), q in zip(ref.named_parameters(), conv.parameters(), strict=True):
        if p.grad is None:
            assert q.grad is None, name
            continue
        if p.grad.double().norm() < 1e-4 * total:
            assert q.grad.double().norm() < 1e-3 * total, name
            continue
        cos = cos64(p.grad, q.grad)
        assert cos >= 0.95, (name, cos)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_vit_exact_forward_saved_bytes_and_gradients(fused: bool, amp: bool) -> None:
    ref, conv = tiny_vit(), tiny_vit()
    for m in (ref, conv):
        for block in m.blocks:
            block.attn.fused_attn = fused
    mesa.convert(conv)
    x = torch.randn(16, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        y_ref, b_ref = saved_bytes(ref, x)
        y_mesa, b_mesa = saved_bytes(conv, x)
    assert torch.equal(y_ref, y_mesa)
    assert b_mesa <= (0.55 if amp else 0.30) * b_ref, b_mesa / b_ref
    target = torch.randint(0, 10, (16,))
    F.cross_entropy(y_ref.float(), target).backward()
    F.cross_entropy(y_mesa.float(), target).backward()
    assert_grads_close(ref, conv)
    s = mesa.summary(conv)
    counts = s.counts()
    assert counts["linear"] == 9 and counts["layer_norm"] == 5
    assert "conv" not in counts  # the patch embedding is excluded by default (image input)
    assert any(r.module == "patch_embed.proj" for r in s.full_precision)
    if fused:
        assert counts["sdpa"] == 2
    else:  # q@kᵀ and attn@v per block; the softmax output is quantised once and reused
        assert counts["matmul"] == 4 and counts["softmax"] == 2


def test_dropout_and_drop_path_stay_bit_identical() -> None:
    # Mesa draws its rounding noise from its own generator: dropout masks are unchanged
    ref = tiny_vit(drop_rate=0.1, attn_drop_rate=0.2, proj_drop_rate=0.1, drop_path_rate=0.1)
    conv = mesa.convert(copy.deepcopy(ref))
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(5)
    y_ref = ref(x)
    torch.manual_seed(5)
    y_mesa = conv(x)
    assert torch.equal(y_ref, y_mesa)
    y_ref.square().mean().backward()
    y_mesa.square().mean().backward()  # attention dropout is replayed in the recomputation
    assert cos64(flat_grad(ref), flat_grad(conv)) >= 0.995


def test_gradient_accumulation_and_checkpointing() -> None:
    ref, conv = tiny_vit(), mesa.convert(tiny_vit())
    conv.set_grad_checkpointing(True)
    ref.set_grad_checkpointing(True)
    x = torch.randn(8, 3, 32, 32)
    for m in (ref, conv):
        for chunk in x.chunk(2):  # two micro-batches accumulate into .grad
            m(chunk).square().mean().backward()
    assert_grads_close(ref, conv)
    # the recomputation inside backward did not update the estimates a second time
    conv2 = mesa.convert(tiny_vit(), mesa.MesaPolicy(momentum=0.5))
    conv2.set_grad_checkpointing(True)
    conv2(x[:4]).sum().backward()
    key = "blocks.0.mlp.act.mesa_gelu0_input"
    rng_after_one = mesa.running_estimates(conv2)[key][0].clone()
    conv3 = mesa.convert(tiny_vit(), mesa.MesaPolicy(momentum=0.5))
    conv3(x[:4])
    torch.testing.assert_close(rng_after_one, mesa.running_estimates(conv3)[key][0])


def test_state_dict_round_trip_and_revert() -> None:
    original = tiny_vit()
    plain_state = copy.deepcopy(original.state_dict())
    hooks_before = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in original.modules()]
    model = mesa.convert(copy.deepcopy(original))
    x = torch.randn(4, 3, 32, 32)
    model(x).sum().backward()
    model(x * 2).sum().backward()
    state = model.state_dict()
    mesa_keys = [k for k in state if k.rsplit(".", 1)[-1].startswith("mesa_")]
    assert "blocks.0.attn.mesa_sdpa0_q_range" in mesa_keys
    assert state["blocks.0.attn.mesa_sdpa0_q_range"].shape == (3,)  # head-wise
    assert set(state) - set(mesa_keys) == set(plain_state)
    # the estimates come after every parameter and buffer (EMA helpers zip over state_dict)
    assert list(state)[: len(plain_state)] == list(plain_state)
    assert list(model.buffers()) == list(original.buffers()) or not list(original.buffers())
    # a fresh converted model (never run) loads the estimates strictly ...
    fresh = mesa.convert(tiny_vit())
    fresh.load_state_dict(state)
    for k in mesa_keys:
        assert torch.equal(fresh.state_dict()[k], state[k])
    # ... and a plain checkpoint loads strictly into a converted model
    model.load_state_dict(plain_state)
    # a plain model loads a Mesa checkpoint without the estimates
    tiny_vit().load_state_dict(mesa.strip_state_dict(state))
    with pytest.raises(ValueError, match="already"):
        mesa.convert(model)

    mesa.revert(model)
    assert not mesa.is_converted(model)
    assert list(model.state_dict()) == list(plain_state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in plain_state.items())
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    assert [
        len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()
    ] == hooks_before
    _, b_reverted = saved_bytes(model, x)
    y_orig, b_orig = saved_bytes(original, x)
    assert b_reverted == b_orig and torch.equal(model(x), y_orig)
    with pytest.raises(ValueError, match="not Mesa-converted"):
        mesa.revert(model)


def test_policy_exclude_and_ops() -> None:
    policy = mesa.MesaPolicy(exclude=("patch_embed*", "head"), ops=("linear", "sdpa"))
    model = mesa.convert(tiny_vit(), policy)
    model(torch.randn(2, 3, 32, 32))
    s = mesa.summary(model)
    assert s.counts() == {"linear": 8, "sdpa": 2}
    assert {"head", "patch_embed.proj"} <= {r.module for r in s.full_precision}
    assert not any(r.module.startswith(("patch_embed", "head")) for r in s.slots)
    text = str(s)
    assert "blocks.1.attn" in text and "sdpa0" in text and "compressed tensors" in text
    with pytest.raises(ValueError, match="unknown op"):
        mesa.MesaPolicy(ops=("lstm",))
    with pytest.raises(ValueError):
        mesa.MesaPolicy(bits=0)


def test_summary_measures_saving_and_restores_state() -> None:
    model = mesa.convert(tiny_vit())
    s = mesa.summary(model, torch.randn(4, 3, 32, 32))
    assert s.baseline_saved_bytes and s.mesa_saved_bytes
    assert s.mesa_saved_bytes < 0.3 * s.baseline_saved_bytes
    text = str(s)
    assert "expected saving" in text and "Kept in full precision" in text
    assert "patch_embed.proj | conv2d" in text  # excluded by the default policy, with its bytes


def test_exception_inside_forward_leaves_no_mode_active() -> None:
    from torch.overrides import _get_current_function_mode_stack

    model = mesa.convert(tiny_vit())
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5, 32, 32))  # wrong channel count
    assert not _get_current_function_mode_stack()
    model(torch.randn(2, 3, 32, 32))  # still usable


def test_ev_litv2_exact_and_close() -> None:
    import timm

    import ev_core  # noqa: F401  (registers the ev models with timm)

    if "litv2_s" not in timm.list_models("litv2*"):
        pytest.skip("ev-core does not register litv2_s in this version")

    def make() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(
            "litv2_s",
            img_size=64,
            depths=(1, 1, 1, 1),
            embed_dim=32,
            num_heads=(1, 2, 4, 8),
            num_classes=10,
            drop_path_rate=0.0,
        )

    ref, conv = make(), mesa.convert(make())
    x = torch.randn(4, 3, 64, 64)
    y_ref, b_ref = saved_bytes(ref, x)
    y_mesa, b_mesa = saved_bytes(conv, x)
    assert torch.equal(y_ref, y_mesa)
    assert b_mesa < 0.6 * b_ref  # the deformable token merging stays full precision
    y_ref.square().mean().backward()
    y_mesa.square().mean().backward()
    assert_grads_close(ref, conv)
    counts = mesa.summary(conv).counts()
    assert counts["linear"] > 0 and counts["layer_norm"] > 0
    assert counts.get("sdpa", 0) + counts.get("matmul", 0) > 0  # HiLo attention caught


@pytest.mark.gpu
def test_cuda_triton_matches_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from ev_compress.mesa import _triton

    x = torch.randn(4, 6, 33, 64, device="cuda") * 3
    layout = mesa.make_layout(x.shape, "heads")
    q_torch = None
    for use_triton in (False, True):
        monkeypatch.setattr(_triton, "available", lambda use=use_triton: use)
        q = mesa.quantize(x, layout, stochastic=False)
        if q_torch is None:
            q_torch = q
        else:
            assert torch.equal(q.data, q_torch.data)
            torch.testing.assert_close(mesa.dequantize(q), mesa.dequantize(q_torch))
        draws = torch.stack([mesa.dequantize(mesa.quantize(x, layout)) for _ in range(200)])
        step = (x.amax(dim=(0, 2, 3)) - x.amin(dim=(0, 2, 3))) / 255
        assert ((draws.mean(0) - x).abs() <= step[None, :, None, None] * 0.25).all()
    ref, conv = tiny_vit().cuda(), mesa.convert(tiny_vit().cuda())
    xb = torch.randn(8, 3, 32, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.equal(ref(xb), conv(xb))
