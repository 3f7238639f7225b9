"""ev-compress's Mesa on ev-core's LITv2: the composition a user of both packages relies on."""

import timm
import torch

import ev_core  # noqa: F401  (registers the LIT/LITv2 models with timm)
from ev_compress import mesa

TINY_LITV2 = dict(
    img_size=64,
    embed_dim=16,
    depths=[1, 1, 2, 1],
    num_heads=[1, 2, 4, 8],
    alpha=0.5,
    local_ws=[0, 0, 2, 1],
    num_classes=10,
    drop_path_rate=0.0,  # stochastic depth would make the two models' train outputs differ
)


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_mesa_litv2_forward_exact_gradients_close_and_revert(restore_rng: None) -> None:
    torch.manual_seed(0)
    model = timm.create_model("litv2_s", **TINY_LITV2)
    reference = timm.create_model("litv2_s", **TINY_LITV2)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 64, 64)
    target = torch.randint(0, 10, (4,))

    mesa.convert(model)
    out = model(x)
    ref_out = reference(x)
    assert torch.equal(out, ref_out)  # Mesa only changes what backward stores

    torch.nn.functional.cross_entropy(out, target).backward()
    torch.nn.functional.cross_entropy(ref_out, target).backward()
    g, g_ref = _flat_grad(model), _flat_grad(reference)
    assert g.shape == g_ref.shape
    cos = torch.nn.functional.cosine_similarity(g, g_ref, dim=0)
    assert cos > 0.99, f"whole-gradient cosine {cos:.4f}"

    mesa.revert(model)
    assert model.state_dict().keys() == reference.state_dict().keys()
    model.eval()
    reference.eval()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
