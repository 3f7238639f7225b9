"""DDP helpers on 2 gloo processes: gradients are averaged, gathers keep gradients."""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import SequentialSampler

from ev_core.distributed import (
    DistInfo,
    DistributedSamplerWrapper,
    all_gather_with_grad,
    get_rank,
    get_world_size,
    init_distributed,
)
from ev_testing import run_distributed


def _ddp_worker(rank: int, world_size: int) -> None:
    info = init_distributed(backend="gloo")
    assert info == DistInfo(rank=rank, world_size=world_size, local_rank=rank, backend="gloo")
    assert get_rank() == rank and get_world_size() == world_size
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    full_x = torch.arange(12.0).reshape(4, 3)
    # reference: gradient of the mean loss over the full batch, one process
    ref = nn.Linear(3, 1)
    ref.load_state_dict(model.state_dict())
    ref(full_x).pow(2).mean().backward()
    ddp = DistributedDataParallel(model)
    ddp(full_x[rank * 2 : rank * 2 + 2]).pow(2).mean().backward()
    torch.testing.assert_close(model.weight.grad, ref.weight.grad)
    torch.testing.assert_close(model.bias.grad, ref.bias.grad)


def _gather_worker(rank: int, world_size: int) -> None:
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = all_gather_with_grad(x)
    assert gathered.shape == (4, 3)
    torch.testing.assert_close(gathered[:2], torch.ones(2, 3))
    torch.testing.assert_close(gathered[2:], torch.full((2, 3), 2.0))
    # every rank's loss weights slice j by (j + 1); grad of local slice = sum over ranks
    weights = torch.arange(1.0, 5.0).unsqueeze(1).expand(4, 3)
    (gathered * weights).sum().backward()
    expected = weights[rank * 2 : rank * 2 + 2] * world_size
    torch.testing.assert_close(x.grad, expected)
    dist.barrier()


@pytest.mark.distributed
def test_ddp_gradients_are_averaged_over_two_gloo_processes() -> None:
    run_distributed(_ddp_worker, world_size=2)


@pytest.mark.distributed
def test_all_gather_with_grad_two_processes() -> None:
    run_distributed(_gather_worker, world_size=2)


def test_single_process_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed() == DistInfo()
    x = torch.ones(2)
    assert all_gather_with_grad(x) is x
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        init_distributed()


def test_sampler_wrapper_shards_and_pads() -> None:
    base = SequentialSampler(range(5))
    shards = [list(DistributedSamplerWrapper(base, num_replicas=2, rank=r)) for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3, 0]]
    assert len(DistributedSamplerWrapper(base, num_replicas=2, rank=0)) == 3
    with pytest.raises(ValueError):
        DistributedSamplerWrapper(base, num_replicas=2, rank=2)


def test_rank_aware_logger_decides_at_emit_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    import ev_core.distributed as evd

    logger = evd.get_logger("ev_core.test_rank_logger")  # created "at import", as rank 0
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger.addHandler(Keep())
    logger.info("rank0 info")
    monkeypatch.setattr(evd, "get_rank", lambda: 1)  # the process group came up later
    logger.info("rank1 info")
    logger.warning("rank1 warning")
    assert [(r.getMessage(), r.rank) for r in records] == [  # type: ignore[attr-defined]
        ("rank0 info", 0),
        ("rank1 warning", 1),
    ]
