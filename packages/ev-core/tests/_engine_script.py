"""A tiny training run used by test_engine.py in subprocesses (killed with SIGKILL on purpose).

Usage: python _engine_script.py OUT_DIR [KILL_AT]
KILL_AT: ``step:<n>`` kills the process after optimizer step n; ``save:<n>:<file>`` kills it
while checkpoint n is being written, right after ``<file>`` was written.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import ev_core.training.engine as engine_module
from ev_core.io import atomic_write
from ev_core.training import Engine, EngineConfig, Hook


def build(out_dir: str, hooks: list[Hook]) -> tuple[Engine, DataLoader]:
    torch.manual_seed(1)
    x = torch.randn(96, 8, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0).long()
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.GELU(), torch.nn.Linear(16, 2)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, 4, 0.5)
    loader = DataLoader(
        TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator()
    )
    cfg = EngineConfig(
        epochs=3,
        grad_accum_steps=2,
        ema_decay=0.9,
        checkpoint_every=2,
        log_every=1,
        keep_checkpoints=2,
    )
    return Engine(model, opt, cfg, scheduler=sched, out_dir=out_dir, hooks=hooks), loader


def step_fn(model: torch.nn.Module, batch: object, engine: Engine) -> dict[str, torch.Tensor]:
    x, y = engine.to_device(batch)
    loss = F.cross_entropy(model(x), y)
    return {"loss": loss}


class KillAtStep(Hook):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, engine: Engine, logs: object) -> None:
        if engine.state.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def kill_during_save(step: int, file_name: str) -> None:
    """Patch the engine's writers so that the process dies right after ``file_name`` of ``step``."""
    originals = {
        "save_checkpoint": engine_module.save_checkpoint,
        "save_training_state": engine_module.save_training_state,
    }

    def wrap(name: str):  # type: ignore[no-untyped-def]
        def inner(path, *args, **kwargs):  # type: ignore[no-untyped-def]
            out = originals[name](path, *args, **kwargs)
            if Path(path).name == file_name and f"step-{step:08d}" in str(path):
                # leave a temp file behind too, as a kill inside atomic_write would
                atomic_write(Path(path).with_name("junk.bin"), lambda p: p.write_bytes(b"x"))
                (Path(path).parent.parent / ".model.safetensors.123.tmp").write_bytes(b"partial")
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        return inner

    for name in originals:
        setattr(engine_module, name, wrap(name))


def main() -> None:
    out_dir = sys.argv[1]
    kill = sys.argv[2] if len(sys.argv) > 2 else ""
    hooks: list[Hook] = []
    if kill.startswith("step:"):
        hooks.append(KillAtStep(int(kill.split(":")[1])))
    elif kill.startswith("save:"):
        _, step, file_name = kill.split(":")
        kill_during_save(int(step), file_name)
    engine, loader = build(out_dir, hooks)
    engine.fit(loader, step_fn)
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in engine.raw_model.state_dict().items()},
        f"{out_dir}/final.safetensors",
    )


if __name__ == "__main__":
    main()
