"""The training engine every ev loop runs on.

A minimal engine, not a framework: the caller owns the model, the optimizer, the data and a
*step function* that turns one micro-batch into named loss terms; the engine owns everything
around it — device and AMP, gradient accumulation and clipping, the optimizer/scheduler step,
EMA, DDP, epoch seeding, non-finite-loss detection, progress, ``metrics.jsonl`` and atomic,
resumable checkpoints (:mod:`ev_core.training.checkpoints`).

Example::

    def step_fn(model, batch, engine):
        x, y = engine.to_device(batch)
        loss = F.cross_entropy(model(x), y)
        return {"loss": loss}

    engine = Engine(model, optimizer, EngineConfig(epochs=3, ema_decay=0.999), out_dir="runs/a")
    result = engine.fit(loader, step_fn)      # resumes from runs/a/checkpoints if present
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ev_core.checkpoint import (
    load_checkpoint,
    load_torch_file,
    save_checkpoint,
    save_training_state,
)
from ev_core.distributed import init_distributed
from ev_core.errors import EvError
from ev_core.io import atomic_write
from ev_core.progress import progress
from ev_core.repro import dump_run_config
from ev_core.training.checkpoints import COMPLETE_MARKER, CheckpointManager
from ev_core.training.config import EngineConfig
from ev_core.training.ema import ModelEma
from ev_core.training.runtime import (
    autocast,
    capture_rng,
    check_writable,
    epoch_seed,
    move_to_device,
    resolve_amp_dtype,
    resolve_device,
    restore_rng,
    seed_rngs,
)
from ev_core.training.state import FitResult, Hook, NonFiniteLossError, StepFn, TrainState

__all__ = ["Engine"]

_log = logging.getLogger(__name__)


def _loader_generator(loader: Any) -> torch.Generator | None:
    gen = getattr(loader, "generator", None)
    return gen if isinstance(gen, torch.Generator) else None


def _set_epoch(loader: Any, epoch: int) -> None:
    batch_sampler = getattr(loader, "batch_sampler", None)
    for obj in (
        getattr(loader, "sampler", None),
        batch_sampler,
        getattr(batch_sampler, "sampler", None),
    ):
        set_epoch = getattr(obj, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)


class Engine:
    """Runs a training loop (see the module docstring).

    Args:
        model: the model (moved to the engine's device; wrapped in DDP under torchrun).
        optimizer: its optimizer (several parameter groups allowed).
        config: the :class:`EngineConfig`.
        scheduler: a ``torch.optim.lr_scheduler.LRScheduler`` stepped after every optimizer step.
        out_dir: where ``config.json``, ``metrics.jsonl`` and ``checkpoints/`` go; checked
            writable at once. ``None``: nothing is written and nothing can be resumed.
        hooks: :class:`Hook` instances, called in order.
        run_config: the caller's own config (dataclass or mapping), dumped with the engine's
            into ``out_dir/config.json``.
        model_config: stored in each checkpoint's ``model.json`` (what rebuilds the model).
        name: the progress bar's label.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: EngineConfig | None = None,
        *,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        out_dir: str | os.PathLike[str] | None = None,
        hooks: Sequence[Hook] = (),
        run_config: Any = None,
        model_config: Any = None,
        name: str = "train",
    ) -> None:
        self.config = cfg = config if config is not None else EngineConfig()
        self.out_dir = check_writable(out_dir) if out_dir is not None else None
        self.checkpoints = (
            CheckpointManager(check_writable(self.out_dir / "checkpoints"), cfg.keep_checkpoints)
            if self.out_dir is not None
            else None
        )
        self.device = resolve_device(cfg.device)
        self.amp_dtype = resolve_amp_dtype(cfg.amp, self.device)
        if dist.is_available() and not dist.is_initialized():
            init_distributed("nccl" if self.device.type == "cuda" else "gloo")
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1
        self.raw_model = model.to(self.device)
        self.model: nn.Module = self.raw_model
        if self.world_size > 1:
            self.model = DistributedDataParallel(
                self.raw_model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters,
            )
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.amp_dtype == torch.float16
        )
        self.ema = (
            ModelEma(self.raw_model, cfg.ema_decay, cfg.ema_warmup)
            if cfg.ema_decay is not None
            else None
        )
        self.hooks = list(hooks)
        self.run_config = run_config
        self.model_config = model_config
        self.name = name
        self.state = TrainState()
        self.extra_state: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self._resume_rng: Mapping[str, Any] | None = None
        self._generator: torch.Generator | None = None
        self._step_terms: dict[str, float] = {}
        self._window: dict[str, float] = {}
        self._window_steps = 0
        self._last_lr = self.lr
        self._last_grad_norm = 0.0
        self._t0 = time.perf_counter()

    # ------------------------------------------------------------------ helpers
    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the process that writes files and shows progress)."""
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast on the engine's device and AMP dtype (a no-op when AMP is off)."""
        return autocast(self.device, self.amp_dtype)

    def to_device(self, batch: Any) -> Any:
        """Move every tensor in ``batch`` (nested containers) to the engine's device."""
        return move_to_device(batch, self.device)

    @property
    def lr(self) -> float:
        """The first parameter group's current learning rate."""
        return float(self.optimizer.param_groups[0]["lr"])

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint folder (``None`` without one or without ``out_dir``)."""
        return self.checkpoints.latest() if self.checkpoints is not None else None

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current state (all ranks must call it).

        Returns:
            The complete step folder, or ``None`` without ``out_dir``.
        """
        manager = self.checkpoints
        if manager is None:
            return None
        step = self.state.step
        if self.is_main:
            manager.begin(step)
        self._barrier()
        folder = manager.partial_dir(step)
        rng = capture_rng(self._generator)
        if self.is_main:
            meta = {"step": step, "epoch": self.state.epoch}
            save_checkpoint(
                folder / "model.safetensors", self.raw_model.state_dict(), self.model_config, meta
            )
            if self.ema is not None:
                save_checkpoint(
                    folder / "ema.safetensors",
                    self.ema.module.state_dict(),
                    self.model_config,
                    meta,
                )
            save_training_state(
                folder / "state.pt",
                {
                    "train_state": dataclasses.asdict(self.state),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict()
                    if self.scheduler is not None
                    else None,
                    "scaler": self.scaler.state_dict(),
                    "ema_updates": int(self.ema.num_updates) if self.ema is not None else 0,
                    "rng": rng,
                    "hooks": [h.state_dict() for h in self.hooks],
                    "extra_state": self.extra_state,
                    "world_size": self.world_size,
                    # the metrics window not yet logged (so that a resumed run logs the same means)
                    "log_window": {
                        "terms": dict(self._window),
                        "steps": self._window_steps,
                        "lr": self._last_lr,
                        "grad_norm": self._last_grad_norm,
                    },
                },
            )
        else:
            save_training_state(folder / f"state_rank{self.rank}.pt", {"step": step, "rng": rng})
        self._barrier()
        if self.is_main:
            manager.commit(step)
        self._barrier()
        return manager.root / manager.dir_name(step)

    def load_checkpoint(self, folder: str | Path) -> None:
        """Restore weights, EMA, optimizer, scheduler, scaler, state, hooks and RNG from ``folder``.

        Raises:
            EvError: naming the file when the folder is incomplete or a file is unreadable.
        """
        folder = Path(folder)
        if not (folder / COMPLETE_MARKER).is_file():
            raise EvError("not a complete checkpoint folder (no COMPLETE marker)", path=folder)
        weights = folder / "model.safetensors"
        try:
            state_dict, _ = load_checkpoint(weights, map_location=str(self.device))
        except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as exc:
            raise EvError(f"cannot read the checkpoint weights: {exc}", path=weights) from None
        try:
            self.raw_model.load_state_dict(state_dict)
        except RuntimeError as exc:
            raise EvError(f"the weights do not fit this model: {exc}", path=weights) from None
        if self.ema is not None:
            ema_file = folder / "ema.safetensors"
            if ema_file.is_file():
                try:
                    ema_state, _ = load_checkpoint(ema_file, map_location=str(self.device))
                    self.ema.module.load_state_dict(ema_state)
                except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                    raise EvError(f"cannot restore the EMA weights: {exc}", path=ema_file) from None
            else:
                _log.warning("%s has no EMA weights: the EMA restarts from the model", folder)
                self.ema.module.load_state_dict(self.raw_model.state_dict())
        state_file = folder / "state.pt"
        try:  # on the CPU: RNG states must stay CPU tensors (the optimizer moves its own state)
            training = load_torch_file(state_file, map_location="cpu")
        except Exception as exc:  # torch raises several types for damaged files
            raise EvError(f"cannot read the training state: {exc}", path=state_file) from None
        self.optimizer.load_state_dict(training["optimizer"])
        if self.scheduler is not None and training["scheduler"] is not None:
            self.scheduler.load_state_dict(training["scheduler"])
        self.scaler.load_state_dict(training["scaler"])
        if self.ema is not None:
            self.ema.num_updates.fill_(int(training["ema_updates"]))
        self.state = TrainState(**training["train_state"])
        for hook, hook_state in zip(self.hooks, training["hooks"], strict=False):
            hook.load_state_dict(hook_state)
        self.extra_state = dict(training["extra_state"])
        window = training.get("log_window")
        if window is not None:
            self._window = dict(window["terms"])
            self._window_steps = int(window["steps"])
            self._last_lr = float(window["lr"])
            self._last_grad_norm = float(window["grad_norm"])
        else:
            self._window, self._window_steps = {}, 0
        rng = training["rng"]
        if self.rank > 0:
            rank_file = folder / f"state_rank{self.rank}.pt"
            if rank_file.is_file():
                rng = load_torch_file(rank_file)["rng"]
            else:
                _log.warning("%s has no RNG state for rank %d: using rank 0's", folder, self.rank)
        self._resume_rng = rng

    # ------------------------------------------------------------------ loop parts
    def _epoch_iterator(self, loader: Iterable[Any]) -> Iterator[Any]:
        epoch = self.state.epoch
        self._generator = _loader_generator(loader)
        seed_rngs(epoch_seed(self.config.seed, epoch, self.rank))
        if self._generator is not None:  # the same data order on every rank
            self._generator.manual_seed(epoch_seed(self.config.seed, epoch))
        _set_epoch(loader, epoch)
        it = iter(loader)
        resume, self._resume_rng = self._resume_rng, None
        if resume is not None and self.state.batch_in_epoch > 0:
            for _ in range(self.state.batch_in_epoch):  # replay the epoch's order up to here
                next(it)
            restore_rng(resume, self._generator)
        return it

    def _check_finite(self, terms: Mapping[str, Tensor]) -> None:
        loss = terms["loss"]
        finite = bool(torch.isfinite(loss.detach()).all())
        if self.world_size > 1:  # every rank must stop together
            flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
            dist.all_reduce(flag)
            finite = float(flag) == 0.0
        if finite:
            return
        bad_name, bad_value = "loss", float(loss.detach().float().sum())
        for name, value in terms.items():
            if name != "loss" and not bool(torch.isfinite(value.detach()).all()):
                bad_name, bad_value = name, float(value.detach().float().sum())
                break
        raise NonFiniteLossError(self.state.step + 1, bad_name, bad_value, self.latest_checkpoint())

    def _micro_step(self, batch: Any, step_fn: StepFn, n_micro: int) -> None:
        with self.autocast():
            out = step_fn(self.model, batch, self)
        if "loss" not in out:
            raise KeyError(f"the step function must return a 'loss' entry, got {sorted(out)}")
        terms = dict(out)
        self._check_finite(terms)
        loss = terms["loss"]
        if self.state.initial_loss is None:
            self.state.initial_loss = abs(float(loss.detach()))
        self.scaler.scale(loss.float() / n_micro).backward()
        for name, value in terms.items():
            self._step_terms[name] = (
                self._step_terms.get(name, 0.0) + float(value.detach().float()) / n_micro
            )

    def _optimizer_step(self) -> float:
        self.scaler.unscale_(self.optimizer)
        grads = [
            p.grad
            for group in self.optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        if self.config.clip_grad_norm is not None:
            params = [
                p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None
            ]
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.clip_grad_norm)
        elif grads:
            norm = torch.nn.utils.get_total_norm(grads)
        else:
            norm = torch.zeros(())
        grad_norm = float(norm)
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            raise NonFiniteLossError(
                self.state.step + 1, "gradient norm", grad_norm, self.latest_checkpoint()
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.raw_model)
        return grad_norm

    def _record(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.out_dir is not None and self.is_main:
            with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def _truncate_metrics(self) -> None:
        """Keep the metrics lines up to the resumed step (a killed run may have logged more;
        with an epoch end pending, that epoch's evaluation is logged again when it re-runs)."""
        path = self.out_dir / "metrics.jsonl" if self.out_dir is not None else None
        if path is None or not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            if not isinstance(record, dict):
                continue
            step = int(record.get("step", 0))
            redone = self.state.epoch_end_pending and step == self.state.step and "eval" in record
            if step <= self.state.step and not redone:
                kept.append(record)
        self.history = kept
        if self.is_main:
            text = "".join(json.dumps(r) + "\n" for r in kept)

            def write_lines(tmp: Path) -> None:
                tmp.write_text(text, encoding="utf-8")

            atomic_write(path, write_lines)

    def _flush(self, bar: Any, lr: float, grad_norm: float) -> None:
        if self._window_steps == 0:
            return
        means = {k: v / self._window_steps for k, v in self._window.items()}
        record = {
            "step": self.state.step,
            "epoch": self.state.epoch,
            "lr": lr,
            "grad_norm": grad_norm,
            **means,
            "time": round(time.perf_counter() - self._t0, 3),
        }
        self._record(record)
        bar.set_postfix(loss=f"{means['loss']:.4g}", lr=f"{lr:.3g}")
        self._window, self._window_steps = {}, 0
        initial = self.state.initial_loss
        if (
            not self.state.diverged
            and initial is not None
            and initial > 0
            and abs(means["loss"]) > self.config.divergence_factor * initial
        ):
            self.state.diverged = True
            message = (
                f"{self.name}: the loss diverges: {means['loss']:.4g} at step {self.state.step} is over "
                f"{self.config.divergence_factor:g}x the first loss ({initial:.4g}); "
                "lower the learning rate or enable gradient clipping"
            )
            _log.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def evaluate(self, epoch: int | None = None) -> dict[str, float]:
        """Run every hook's ``on_eval`` now and log the merged metrics (the loop calls it every
        ``eval_every`` epochs; call it yourself, e.g. after a run that ended mid-epoch).

        Args:
            epoch: the epoch to report (default: the last completed one).

        Returns:
            The merged metrics (empty when no hook returned any).
        """
        epoch = self.state.epoch - 1 if epoch is None else epoch
        metrics: dict[str, float] = {}
        for hook in self.hooks:
            out = hook.on_eval(self, epoch)
            if out:
                metrics.update(out)
        if metrics:
            self._record({"step": self.state.step, "epoch": epoch, "eval": dict(metrics)})
        return metrics

    def _total_steps(self, loader: Iterable[Any]) -> int | None:
        cfg = self.config
        try:
            n_batches = len(loader)  # type: ignore[arg-type]
        except TypeError:
            return cfg.max_steps
        total = cfg.epochs * math.ceil(n_batches / cfg.grad_accum_steps)
        return min(total, cfg.max_steps) if cfg.max_steps is not None else total

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        loader: Iterable[Any],
        step_fn: StepFn,
        *,
        resume: bool | str | Path = True,
        stop_at_step: int | None = None,
    ) -> FitResult:
        """Train until ``epochs``/``max_steps`` (or ``stop_at_step``) is reached.

        Args:
            loader: an iterable of batches, re-iterated every epoch (e.g. a ``DataLoader``;
                give it a ``generator`` or a sampler with ``set_epoch`` for a seeded order).
            step_fn: ``step_fn(model, batch, engine) -> {"loss": ..., ...}`` (runs under autocast).
            resume: ``True`` continues from the newest complete checkpoint in ``out_dir`` when
                there is one; a path continues from that step folder; ``False`` starts afresh.
            stop_at_step: return after this optimizer step, with a checkpoint (to split a run).

        Returns:
            :class:`FitResult`.

        Raises:
            NonFiniteLossError: at the first non-finite loss term or gradient norm.
        """
        cfg = self.config
        if self.checkpoints is not None and self.is_main:
            for leftover in self.checkpoints.cleanup():
                _log.info("removed the leftover of an interrupted save: %s", leftover)
        self._barrier()
        if resume is not False and not isinstance(resume, bool):
            self.load_checkpoint(resume)
        elif resume is True and (latest := self.latest_checkpoint()) is not None:
            self.load_checkpoint(latest)
            _log.info("%s: resumed from %s (step %d)", self.name, latest, self.state.step)
        if self.checkpoints is not None and self.is_main:
            # checkpoints past the start belong to another run (fresh start, or a resume from
            # an older checkpoint): kept, they would outrank this run's and be resumed instead
            for stale in self.checkpoints.discard_after(self.state.step):
                _log.warning("%s: removed %s (after this run's start)", self.name, stale)
        self._barrier()
        if self.state.step > 0:
            self._truncate_metrics()
        elif self.out_dir is not None and self.is_main:
            (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
        if self.out_dir is not None and self.is_main:
            dump_run_config(
                {"engine": cfg, "run": self.run_config, "world_size": self.world_size}, self.out_dir
            )
        try:
            n_batches: int | None = len(loader)  # type: ignore[arg-type]
        except TypeError:
            n_batches = None
        if n_batches == 0:
            raise EvError(f"{self.name}: the training data is empty (0 batches)")
        total = self._total_steps(loader)
        accum = cfg.grad_accum_steps
        if getattr(loader, "persistent_workers", False) and getattr(loader, "num_workers", 0) > 0:
            message = (
                f"{self.name}: the loader has persistent_workers=True: its workers' RNG carries over "
                "between epochs and is not in the checkpoints, so randomness drawn inside the "
                "workers differs after a resume (persistent_workers=False resumes bit-exactly)"
            )
            _log.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        for hook in self.hooks:
            hook.on_fit_start(self)
        self.model.train()
        grad_norm = self._last_grad_norm
        stopped_early = False
        done = total is not None and self.state.step >= total
        with progress(total=total, initial=self.state.step, desc=self.name) as bar:
            if self.state.epoch_end_pending:  # the process died after the epoch's checkpoint
                self._end_epoch(self.state.epoch - 1)
                self.model.train()
            while self.state.epoch < cfg.epochs and not done and not stopped_early:
                epoch = self.state.epoch
                if self.state.batch_in_epoch == 0:
                    for hook in self.hooks:
                        hook.on_epoch_start(self, epoch)
                it = self._epoch_iterator(loader)
                exhausted = True
                for batch in it:
                    idx = self.state.batch_in_epoch
                    group_start = idx - idx % accum
                    n_micro = accum if n_batches is None else min(accum, n_batches - group_start)
                    last_micro = idx - group_start == n_micro - 1
                    sync = (
                        self.model.no_sync()
                        if isinstance(self.model, DistributedDataParallel) and not last_micro
                        else contextlib.nullcontext()
                    )
                    with sync:
                        self._micro_step(batch, step_fn, n_micro)
                    self.state.batch_in_epoch += 1
                    if not last_micro:
                        continue
                    grad_norm = self._step_and_log(bar, grad_norm)
                    done = total is not None and self.state.step >= total
                    if done or (stop_at_step is not None and self.state.step >= stop_at_step):
                        exhausted = n_batches is not None and self.state.batch_in_epoch >= n_batches
                        stopped_early = not done
                        if stopped_early:  # a later fit() on this engine continues from here
                            self._resume_rng = capture_rng(self._generator)
                        break
                    if (
                        cfg.checkpoint_every
                        and self.state.step % cfg.checkpoint_every == 0
                        and (n_batches is None or self.state.batch_in_epoch < n_batches)
                    ):
                        self.save_checkpoint()
                else:
                    if self.state.batch_in_epoch % accum and n_batches is None:
                        grad_norm = self._step_and_log(bar, grad_norm)  # the last partial group
                if exhausted or not stopped_early:  # else the window is saved, logged later
                    self._flush(bar, self._last_lr, grad_norm)
                if exhausted:
                    self.state.epoch += 1
                    self.state.batch_in_epoch = 0
                    self.state.epoch_end_pending = True
                self.save_checkpoint()
                if exhausted:
                    self._end_epoch(epoch)
        for hook in self.hooks:
            hook.on_fit_end(self)
        self._barrier()
        return FitResult(
            self.state, list(self.history), not stopped_early, self.latest_checkpoint()
        )

    def _end_epoch(self, epoch: int) -> None:
        """``on_epoch_end`` hooks and the evaluation of ``epoch`` (after its checkpoint)."""
        for hook in self.hooks:
            hook.on_epoch_end(self, epoch)
        if self.config.eval_every and (epoch + 1) % self.config.eval_every == 0:
            self.evaluate(epoch)
        self.state.epoch_end_pending = False

    def _step_and_log(self, bar: Any, grad_norm: float) -> float:
        lr = self._last_lr = self.lr
        step_terms, self._step_terms = self._step_terms, {}
        grad_norm = self._last_grad_norm = self._optimizer_step()
        self.state.step += 1
        for name, value in step_terms.items():
            self._window[name] = self._window.get(name, 0.0) + value
        self._window_steps += 1
        bar.update(1)
        logs = {**step_terms, "lr": lr, "grad_norm": grad_norm}
        for hook in self.hooks:
            hook.on_step_end(self, logs)
        if self.state.step % self.config.log_every == 0:
            self._flush(bar, lr, grad_norm)
        return grad_norm
