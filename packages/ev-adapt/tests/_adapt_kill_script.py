"""A short MCL run on the digits shift, used by test_kill.py in subprocesses (killed on purpose).

Usage: python _adapt_kill_script.py OUT_DIR [KILL_AFTER_STEP]
"""

from __future__ import annotations

import os
import signal
import sys

import torch

import ev_adapt.trainer as trainer
from ev_adapt import AdaptConfig, AdaptModelConfig, build_model, train_adaptation
from ev_adapt.data import digits_shift

MODEL = AdaptModelConfig(backbone="digits_cnn", num_classes=10, bottleneck_dim=32, in_chans=1)


def main() -> None:
    out_dir = sys.argv[1]
    kill_after = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    if kill_after:
        update = trainer._PrototypeHook.on_step_end

        def on_step_end(self, engine, logs):  # type: ignore[no-untyped-def]
            update(self, engine, logs)
            if engine.state.step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

        trainer._PrototypeHook.on_step_end = on_step_end  # type: ignore[method-assign]
    config = AdaptConfig.preset(
        "digits",
        method="mcl",
        steps=20,
        eval_every=8,
        device="cpu",
        source_batch=8,
        target_batch=8,
        unlabeled_batch=16,
        ot_start=6,
        proto_warmup=2,
    )
    torch.manual_seed(0)
    train_adaptation(digits_shift(seed=0, shots=1), build_model(MODEL), config, out_dir, MODEL)


if __name__ == "__main__":
    main()
