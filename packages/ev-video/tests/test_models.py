"""STPT: shapes, FLOPs, window == global attention, head targets/losses, Soft-NMS, registry."""

from __future__ import annotations

import dataclasses
import math

import pytest
import timm
import torch

from ev_core import get_model_config
from ev_core.layers import MultiHeadSelfAttention
from ev_video.models import (
    STPT,
    WindowAttention3D,
    assign_targets,
    count_video_flops,
    create,
    diou_loss_1d,
    soft_nms,
)
from ev_video.models.head import make_points


def _tiny(**kw: object) -> STPT:
    return create("stpt_tiny", num_classes=3, **kw)


def test_window_attention_equals_global_when_one_window_covers() -> None:
    torch.manual_seed(0)
    win = WindowAttention3D(16, 2, (8, 8, 8)).double()
    ref = MultiHeadSelfAttention(16, 2).double()
    ref.load_state_dict(win.state_dict())
    x = torch.randn(2, 4 * 3 * 5, 16, dtype=torch.float64)
    torch.testing.assert_close(win(x, (4, 3, 5)), ref(x), rtol=0, atol=1e-12)


def test_window_attention_is_local_and_masks_padding() -> None:
    torch.manual_seed(0)
    attn = WindowAttention3D(8, 2, (2, 2, 2)).double()
    x = torch.randn(1, 3 * 3 * 3, 8, dtype=torch.float64, requires_grad=True)
    out = attn(x, (3, 3, 3)).view(1, 3, 3, 3, 8)
    # token (0,0,0) only sees its own window (t,h,w in {0,1}): no gradient from elsewhere
    out[0, 0, 0, 0].sum().backward()
    g = x.grad.view(3, 3, 3, 8).abs().sum(-1)
    assert g[:2, :2, :2].gt(0).all() and g[2].eq(0).all() and g[:, 2].eq(0).all()
    # the last (padded) window is plain attention over its real tokens only
    ref = MultiHeadSelfAttention(8, 2).double()
    ref.load_state_dict(attn.state_dict())
    corner = x.detach().view(1, 3, 3, 3, 8)[:, 2, 2, 2].reshape(1, 1, 8)
    torch.testing.assert_close(
        attn(x.detach(), (3, 3, 3)).view(1, 3, 3, 3, 8)[:, 2, 2, 2],
        ref(corner)[:, 0],
        rtol=0,
        atol=1e-12,
    )


def test_stpt_shapes_and_backward() -> None:
    torch.manual_seed(0)
    model = _tiny()
    x = torch.randn(2, 3, 32, 40, 40)
    out = model(x)
    # stem T/2=16 -> stages 16, 8, 4, 2 frames; pyramid from stages 3-4 (strides 8, 16) + 2 levels
    assert model.strides == [8, 16, 32, 64]
    assert out.cls_logits.shape == (2, 4 + 2 + 1 + 1, 3) and out.distances.shape == (2, 8, 2)
    assert (out.distances >= 0).all()
    losses = model.loss(
        out,
        [torch.tensor([[2.0, 20.0]]), torch.zeros(0, 2)],
        [torch.tensor([1]), torch.zeros(0, dtype=torch.long)],
    )
    assert set(losses) >= {"loss", "cls_loss", "reg_loss"} and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    pred = model.predict(x, valid=[32.0, 20.0])
    assert pred[1]["segments"].numel() == 0 or pred[1]["segments"].max() <= 20.0


def test_stpt_s_flops_local_vs_global_at_96x96x64() -> None:
    """The paper's cost argument: local windows early cut FLOPs vs global attention everywhere."""
    with torch.device("meta"):  # no memory: global attention over 18,432 tokens is 2.7 GB
        local = create("stpt_s", num_classes=20).eval()
        glob = create("stpt_s", num_classes=20, windows=(None, None, None, None)).eval()
    f_local = count_video_flops(local, (3, 64, 96, 96))
    f_glob = count_video_flops(glob, (3, 64, 96, 96))
    assert f_glob > 1.5 * f_local
    # analytic attention cost of stage 1: 32x24x24 tokens, C=64 -> windows (8,6,6)=288 tokens
    n, c, w = 32 * 24 * 24, 64, 8 * 6 * 6
    qk_av_local = 2 * (2 * n * w * c)  # q@k^T and attn@v, 2 FLOPs per MAC
    qk_av_glob = 2 * (2 * n * n * c)
    depth1 = 2
    expected_gap_stage1 = depth1 * (qk_av_glob - qk_av_local)
    # stage 2: 16x12x12 tokens, C=128, windows 288 tokens
    n2, c2 = 16 * 12 * 12, 128
    expected_gap = expected_gap_stage1 + 2 * (2 * (2 * n2 * n2 * c2) - 2 * (2 * n2 * w * c2))
    assert f_glob - f_local == expected_gap


def test_registry_and_config() -> None:
    cfg = get_model_config("stpt_s")
    assert cfg.dims == (64, 128, 256, 512) and cfg.windows[2] is None
    m = timm.create_model("stpt_tiny", num_classes=5)
    assert isinstance(m, STPT) and m.num_classes == 5
    with pytest.raises(KeyError):
        create("stpt_xl")
    with pytest.raises(TypeError, match="unknown STPTConfig"):
        create("stpt_tiny", colour=3)
    assert dataclasses.replace(cfg, num_classes=3).num_classes == 3


def test_assign_targets_hand() -> None:
    pts = make_points([4, 2], [8, 16], [(0, 4), (4, 100)])  # centres 4,12,20,28 | 8,24
    seg = torch.tensor([[6.0, 22.0]])  # length 16, centre 14
    cls_t, reg_t = assign_targets(pts, seg, torch.tensor([2]), 3, radius=1.5)
    # level 0 (stride 8): centre region [14-12, 14+12] ∩ [6,22] -> points 12, 20; max dist 10, 14 <= 32
    pos = cls_t.sum(1).nonzero().squeeze(1).tolist()
    assert pos == [1, 2] and cls_t[1, 2] == 1
    torch.testing.assert_close(reg_t[1], torch.tensor([6 / 8, 10 / 8]))
    # level 1 (stride 16, range >= 4 strides = 64 frames): segment too short -> no positive
    assert cls_t[4:].sum() == 0


def test_diou_loss_hand() -> None:
    same = diou_loss_1d(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0]]))
    assert same.item() == pytest.approx(0.0)
    # pred [-1, 1], target [-2, 4] around the same point: IoU 2/6, centres 0 vs 1, enclose 6
    val = diou_loss_1d(torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 4.0]]))
    assert val.item() == pytest.approx(1 - 2 / 6 + 1 / 36)


def test_soft_nms_hand() -> None:
    segs = torch.tensor([[0.0, 10.0], [0.0, 9.0], [20.0, 30.0], [0.0, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 0, 1])
    _, out_c, out_l = soft_nms(segs, scores, labels, sigma=0.5, min_score=0.001)
    # 0.9 kept; 0.8 decayed by exp(-0.81/0.5); 0.7 untouched (no overlap); class 1 untouched
    expected = sorted([0.9, 0.8 * math.exp(-0.81 / 0.5), 0.7, 0.6], reverse=True)
    torch.testing.assert_close(out_c, torch.tensor(expected))
    assert out_l.tolist() == [0, 0, 1, 0]
    _, few, _ = soft_nms(segs, scores, labels, max_segments=2)
    assert len(few) == 2
    _, single_class, _ = soft_nms(segs, scores, labels, multiclass=False)
    assert single_class[-1] < 0.6  # the class-1 duplicate is decayed too
