"""Mesa under DistributedDataParallel (two gloo CPU workers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ev_compress import mesa
from ev_testing import run_distributed


class TinyBlock(nn.Module):
    """LN → qkv → SDPA → proj → GELU MLP: the ops of a transformer block."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
        return x + self.mlp(x)


def _ddp_worker(rank: int, world_size: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = mesa.convert(TinyBlock())
    reference = TinyBlock()
    reference.load_state_dict(mesa.strip_state_dict(model.state_dict()))
    ddp = DDP(model)
    torch.manual_seed(rank)
    x = torch.randn(4, 5, 16)
    out = ddp(x)
    assert torch.equal(out, reference(x))  # exact forward under DDP
    out.square().mean().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    gathered = [torch.empty_like(grads) for _ in range(world_size)]
    torch.distributed.all_gather(gathered, grads)
    assert torch.equal(gathered[0], gathered[1])  # all-reduced
    # and close to the full-precision all-reduced gradient
    reference(x).square().mean().backward()
    ref = torch.cat([p.grad.flatten() for p in reference.parameters()])
    torch.distributed.all_reduce(ref)
    r, g = (ref / world_size).double(), grads.double()
    assert float(r @ g / (r.norm() * g.norm())) > 0.995  # float64 cosine
    assert mesa.summary(model).counts() == {"layer_norm": 1, "linear": 4, "sdpa": 1, "gelu": 1}


@pytest.mark.distributed
def test_ddp() -> None:
    run_distributed(_ddp_worker, world_size=2)
