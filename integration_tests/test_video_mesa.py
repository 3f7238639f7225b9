"""ev-compress's Mesa on ev-video's STPT: 8-bit activation-compressed training of a detector step.

A downstream app that trains STPT under a memory budget converts it with ``mesa.convert`` and
runs the same loss; the forward must be unchanged, the gradients close, and training through
``ev_core.training.Engine`` must still work and lower the loss.
"""

import torch

from ev_compress import mesa
from ev_core.training import Engine, EngineConfig
from ev_video.models import create

KW = dict(num_classes=3, drop_path_rate=0.0)


def _batch() -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, 32, generator=g)
    segs = [torch.tensor([[4.0, 20.0]]), torch.tensor([[10.0, 30.0], [0.0, 6.0]])]
    labels = [torch.tensor([0]), torch.tensor([2, 1])]
    return x, segs, labels


def _flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()


def test_mesa_stpt_step_forward_exact_gradients_close(restore_rng: None) -> None:
    torch.manual_seed(0)
    model = create("stpt_tiny", **KW)
    reference = create("stpt_tiny", **KW)
    reference.load_state_dict(model.state_dict())
    x, segs, labels = _batch()
    mesa.convert(model)
    out, ref_out = model(x), reference(x)
    assert torch.equal(out.cls_logits, ref_out.cls_logits)
    assert torch.equal(out.distances, ref_out.distances)
    model.loss(out, segs, labels)["loss"].backward()
    reference.loss(ref_out, segs, labels)["loss"].backward()
    g, g_ref = _flat_grad(model), _flat_grad(reference)
    cos = torch.nn.functional.cosine_similarity(g, g_ref, dim=0)
    assert cos > 0.99, f"whole-gradient cosine {cos:.4f}"
    mesa.revert(model)
    assert model.state_dict().keys() == reference.state_dict().keys()


def test_mesa_stpt_trains_on_the_engine(restore_rng: None) -> None:
    torch.manual_seed(0)
    model = mesa.convert(create("stpt_tiny", **KW))
    batch = _batch()

    def step(m: torch.nn.Module, b: tuple, engine: Engine) -> dict[str, torch.Tensor]:
        x, segs, labels = b
        return model.loss(m(x), segs, labels)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine = Engine(model, opt, EngineConfig(epochs=1, device="cpu", amp="off", log_every=1))
    result = engine.fit([batch] * 8, step, resume=False)
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert result.state.step == 8 and losses[-1] < losses[0]
