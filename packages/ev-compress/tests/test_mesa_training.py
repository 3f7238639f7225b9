"""Mesa inside a real training recipe: copies/pickling/EMA, checkpointing, eval mode, per-tensor
gradient fidelity on full-size models, and graph memory as the process feels it (RSS)."""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ev_compress import mesa


def tiny_vit(**kwargs: object) -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10, **kwargs
    )


def cos64(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def train_step(model: nn.Module, x: Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()


# -- copies, pickling, EMA -------------------------------------------------------------------


def test_deepcopy_pickle_torch_save_and_timm_model_ema() -> None:
    from timm.utils import ModelEmaV3

    model = mesa.convert(tiny_vit())
    ema_before_first_forward = ModelEmaV3(model, decay=0.5)
    x = torch.randn(4, 3, 32, 32)
    train_step(model, x)
    copies = [
        copy.deepcopy(model),
        pickle.loads(pickle.dumps(model)),
        torch.load(_saved(model), weights_only=False),
        ModelEmaV3(model, decay=0.9).module,
    ]
    estimates = mesa.running_estimates(model)
    assert estimates
    for c in copies:
        assert mesa.is_converted(c)
        c.train()  # ModelEmaV3 keeps its copy in eval mode
        got = mesa.running_estimates(c)
        assert got.keys() == estimates.keys()
        assert all(torch.equal(got[k][0], estimates[k][0]) for k in estimates)
        assert torch.equal(c(x), model(x))  # exact forward
        train_step(c, torch.randn(4, 3, 32, 32) * 3)  # a copy trains on its own estimates
        moved = mesa.running_estimates(c)
        assert any(not torch.equal(moved[k][0], estimates[k][0]) for k in estimates)
        assert mesa.summary(c).counts() == mesa.summary(model).counts()
        mesa.revert(c)
        assert not any(k.rsplit(".", 1)[-1].startswith("mesa_") for k in c.state_dict())
    # the original is untouched by its copies
    assert all(torch.equal(mesa.running_estimates(model)[k][0], estimates[k][0]) for k in estimates)
    # EMA made before the first forward: its state_dict has no estimates; timm zips the two
    # state_dicts, so the estimates must come last for parameters to stay aligned
    ema_before_first_forward.update(model)
    for (name, p_ema), p in zip(
        ema_before_first_forward.module.named_parameters(), model.parameters(), strict=True
    ):
        assert p_ema.shape == p.shape, name
    ema_params = dict(ema_before_first_forward.module.named_parameters())
    init = dict(tiny_vit().named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(ema_params[name], 0.5 * init[name] + 0.5 * p.detach())


def _saved(model: nn.Module) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return buf


# -- checkpointing ------------------------------------------------------------------------------


class _Blocks(nn.Module):
    """Stem + three checkpointable MLP blocks; ``mode``: None, "reentrant", "non-reentrant"."""

    def __init__(self, mode: str | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mode = mode
        self.stem = nn.Linear(16, 32)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
            for _ in range(3)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            if self.mode is None:
                x = x + block(x)
            else:
                x = x + checkpoint(block, x, use_reentrant=self.mode == "reentrant")
        return x


def test_checkpointing_updates_estimates_once_per_step_in_both_modes() -> None:
    # reuse=False: every mode quantises the same tensors (inside a non-reentrant checkpoint a
    # linear layer does not rebuild its input from the norm's/GELU's codes, see below)
    policy = mesa.MesaPolicy(momentum=0.5, reuse=False)
    models = {m: mesa.convert(_Blocks(m), policy) for m in (None, "reentrant", "non-reentrant")}
    g = torch.Generator().manual_seed(0)
    key = "stem.mesa_linear0_input"  # the blocks' quantised tensors are scale-free (normalised)
    seen = []
    for scale in (1.0, 10.0, 100.0):  # the issue's ×1/×10/×100 inputs
        x = torch.randn(8, 5, 16, generator=g) * scale
        ranges = {}
        for mode, model in models.items():
            model(x).square().mean().backward()
            ranges[mode] = {k: v[0].clone() for k, v in mesa.running_estimates(model).items()}
        assert ranges[None].keys() == ranges["reentrant"].keys() == ranges["non-reentrant"].keys()
        for k in ranges[None]:
            for mode in ("reentrant", "non-reentrant"):
                torch.testing.assert_close(ranges[mode][k], ranges[None][k], msg=f"{mode} {k}")
        seen.append(float(ranges[None][key].max()))
    assert seen[0] < seen[1] < seen[2]  # the estimates follow the inputs (momentum 0.5)
    # and gradients of the checkpointed models match the plain one's closely
    x = torch.randn(8, 5, 16, generator=g)
    grads = {}
    for mode, model in models.items():
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
    for mode in ("reentrant", "non-reentrant"):
        assert cos64(grads[mode], grads[None]) > 0.99  # different rounding noise only


# -- eval mode -----------------------------------------------------------------------------------


def test_eval_mode_runs_the_plain_ops() -> None:
    ref, model = tiny_vit(), mesa.convert(tiny_vit())
    ref.eval()
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    params = list(model.parameters())
    with mesa.SavedTensorMeter(params) as m_conv:
        y = model(x)  # gradients enabled, but eval(): nothing is compressed
    with mesa.SavedTensorMeter(list(ref.parameters())) as m_ref:
        y_ref = ref(x)
    assert torch.equal(y, y_ref)
    assert m_conv.total_bytes == m_ref.total_bytes
    assert mesa.running_estimates(model) == {} and not mesa.summary(model).slots
    model.train()
    with mesa.SavedTensorMeter(params) as m_train:
        model(x)
    assert m_train.total_bytes < 0.4 * m_ref.total_bytes


# -- per-tensor gradient fidelity at init (full-size models) ----------------------------------


def _grads(model: nn.Module, x: Tensor, target: Tensor, threads: int = 1) -> dict[str, Tensor]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same drop-path draws in every run
        F.cross_entropy(model(x), target).backward()
    finally:
        torch.set_num_threads(before)
    return {n: p.grad.detach().double().flatten() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "batch"),
    [("vit_small_patch16_224", 4), ("swin_tiny_patch4_window7_224", 2), ("litv2_s", 2)],
)
def test_every_tensor_gradient_cosine_at_init(name: str, batch: int) -> None:
    """Every parameter gradient of Mesa vs the fp32 baseline has cosine >= 0.95 (float64
    cosines), for every tensor whose fp32 gradient is reproducible: at init some Swin-T
    tensors' fp32 gradients differ between 1 and 2 threads (summation order alone) with a
    cosine of ~0.57 (rounding amplified through the network), so no compressed or even
    re-ordered computation can match them; those are reported, not asserted."""
    import timm

    import ev_core  # noqa: F401  (registers litv2_s)

    torch.manual_seed(0)
    base = timm.create_model(name)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    target = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(2))
    g32 = _grads(base, x, target)
    g32_reordered = _grads(base, x, target, threads=2)
    gm = _grads(mesa.convert(copy.deepcopy(base)), x, target)
    stable = [n for n in g32 if cos64(g32[n], g32_reordered[n]) >= 0.99]
    assert len(stable) >= 0.9 * len(g32), sorted(set(g32) - set(stable))
    worst = min((cos64(g32[n], gm[n]), n) for n in stable)
    assert worst[0] >= 0.95, worst
    if name.startswith("vit"):  # well conditioned: every tensor counts
        assert len(stable) == len(g32)


# -- graph memory as the process feels it -------------------------------------------------------

_RSS_SCRIPT = r"""
import gc, json, sys
import torch, timm
from ev_compress import mesa
torch.manual_seed(0)
variant = sys.argv[1]
model = timm.create_model("vit_small_patch16_224", depth=2, num_classes=10)
if variant != "baseline":
    mesa.convert(model)
if variant == "leak":  # what the test must catch: a full-precision copy kept beside the codes
    from ev_compress.mesa.ops import linear
    def leaky(ctx, inputs, output):
        ctx.leak = inputs[0].clone()
        linear._linear_setup(ctx, inputs, output)
    linear.linear_op.register_autograd(linear._linear_backward, setup_context=leaky)
x = torch.randn(4, 3, 224, 224)
model(x).sum().backward()  # first step: lazily created state, allocator warm
model.zero_grad(set_to_none=False)
gc.collect()
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
before = rss()
out = model(x)  # the autograd graph (and everything it saved) is alive
after = rss()
print(json.dumps({"growth": after - before}))
"""


def _graph_rss(variant: str) -> int:
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",  # large blocks are mmapped: freed memory leaves RSS
        "OMP_NUM_THREADS": "1",
    }
    res = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, variant],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return int(json.loads(res.stdout.strip().splitlines()[-1])["growth"])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_graph_rss_in_a_fresh_process() -> None:
    """VmRSS growth across a forward whose graph stays alive: converted vs not, and a converted
    model that also keeps a full-precision copy of each linear input (the leak this test exists
    to catch, invisible to every saved-tensor-hook byte count)."""
    base, ours, leak = (_graph_rss(v) for v in ("baseline", "mesa", "leak"))
    assert base > 15 * 2**20, base  # the graph of 2 ViT-S blocks at batch 4 is ~35 MiB
    assert ours < 0.45 * base, (ours / base, ours, base)
    assert leak > 0.45 * base, (leak / base, leak, base)  # the detector detects


# -- bf16: activations only ------------------------------------------------------------------------


def test_meter_separates_autocast_weight_casts() -> None:
    model = tiny_vit()
    x = torch.randn(8, 3, 32, 32)
    params = list(model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with mesa.SavedTensorMeter(params) as everything:
            model(x)
        with mesa.SavedTensorMeter(params, activations_only=True) as acts:
            model(x)
    # autocast keeps a bf16 copy of every linear weight for backward: counted apart
    weights = sum(
        p.numel() * 2 for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2
    )
    assert acts.param_cast_bytes >= weights
    assert acts.total_bytes + acts.param_cast_bytes == everything.total_bytes


class _NormOutside(nn.Module):
    """A norm outside the checkpointed function, an activation inside a checkpointed method
    (the norm → linear and GELU → linear pairs a converted model rebuilds without checkpoints)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(16)
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)

    def part(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def forward(self, x: Tensor) -> Tensor:
        return x + checkpoint(self.part, self.norm(x), use_reentrant=False)


def test_non_reentrant_checkpoint_regions_keep_their_own_codes() -> None:
    """Inside a non-reentrant checkpoint a linear layer quantises its input rather than
    rebuilding it from a norm's or activation's codes: the recomputation in backward (no module
    around the checkpointed method) must decide as the original forward did. Before, this model
    raised ``CheckpointError`` (a different number of saved tensors) and a norm-free variant got
    ``fc2``'s input as GELU applied twice (weight-gradient error 0.27)."""
    plain = _NormOutside().double()
    x = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = mesa.MesaPolicy(momentum=0.0, stochastic_rounding=False)
    model = mesa.convert(copy.deepcopy(plain), exact)
    for m in (plain, model):
        m(x).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), model.parameters(), strict=True):
        rel = float((q.grad - p.grad).norm() / p.grad.norm())
        assert rel < 0.02, (name, rel)  # 8-bit codes, nothing rebuilt from the wrong codes
    rebuilt = [s for s in mesa.summary(model).slots if s.rebuilt]
    assert not rebuilt
