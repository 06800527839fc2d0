"""A training run's parts, built in the order Job.setup calls them (summ/training/loop.py), and
`Setup`, the typed result the loop, save and evaluation read: the Accelerator and the batch shape,
the loaders and the optimizer prepared by it, the learning-rate schedule and the run's length."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple

import torch

from summ.config import Config, ModelKind, resolve_batch
from summ.data.packing import PackingCollator
from summ.data.sampler import EpochSampler
from summ.data.tokenize import Collator, Encoder
from summ.errors import ConfigError
from summ.measure import machine
from summ.modeling.checks import check_packed_rows_isolated
from summ.run_folder import RunMetrics
from summ.training import cleanup, launchers, processes, tracking
from summ.training.optimizers import build_optimizer
from summ.training.prepare import PreparedData
from summ.training.schedule import (
    Schedule,
    epoch_plan,
    schedule_length,
    token_batches,
    token_schedule,
    warmup_steps,
    window,
)


@dataclass(frozen=True)
class BatchShape:
    """Micro-batch x accumulation x processes: one optimizer step's samples. With a token budget
    (batch.max_tokens) a micro-batch's samples vary: micro_batch and effective are then None."""

    micro_batch: int | None
    accumulation: int
    processes: int
    max_tokens: int | None = None

    @property
    def effective(self) -> int | None:
        return None if self.micro_batch is None else self.micro_batch * self.accumulation * self.processes

    @property
    def per_step(self) -> int:
        """Micro-batches behind one optimizer step, over all processes."""
        return self.accumulation * self.processes

    def text(self) -> str:
        size = f"micro-batch {self.micro_batch}" if self.max_tokens is None else f"{self.max_tokens} tokens"
        each = f" x accumulation {self.accumulation} x processes {self.processes}"
        return size + each + ("" if self.effective is None else f" = effective batch {self.effective}")


class Prepared(NamedTuple):
    """What Accelerate prepared (the model wrapped where it launches several processes), and the
    collator the loaders batch with."""

    model: torch.nn.Module
    optimizer: Any
    train_loader: torch.utils.data.DataLoader
    dev_loader: torch.utils.data.DataLoader
    collator: Collator | PackingCollator


@dataclass
class Setup:
    """What setup hands the loop, save and evaluation."""

    accelerator: Any  # accelerate.Accelerator
    model: torch.nn.Module  # prepared by the Accelerator (wrapped where it launches several processes)
    optimizer: Any
    train_loader: torch.utils.data.DataLoader
    dev_loader: torch.utils.data.DataLoader
    collator: Collator | PackingCollator
    scheduler: Any  # stepped once per optimizer step, on every process; saved with a checkpoint
    data: PreparedData  # splits, a K-fold member's held-out fold, the tokenized datasets
    tokenizer: Any
    encoder: Encoder
    kind: ModelKind
    shape: BatchShape
    schedule: Schedule
    copy_to: torch.device | None = None  # where the loop copies each micro-batch (copy_in_the_step)

    def on_device(self, batch: dict) -> dict:
        """The micro-batch on the training device, copied in the step where the loader left it on the host."""
        if self.copy_to is None:
            return batch
        from accelerate.utils import send_to_device

        return send_to_device(batch, self.copy_to)


def copy_in_the_step(loader) -> torch.device | None:
    """Take the host-to-device copy out of Accelerate's loader and into the step, where it is timed
    as a phase of its own (summ/measure/timing.py: PHASES). Accelerate's DataLoaderShard copies each
    batch to `loader.device` in its `__iter__` unless that is None; the copy the step makes instead
    is the same call (send_to_device, blocking as the loader's default). Other loaders (a dispatching
    one, DeepSpeed's) keep their copy: it is then timed as data. Returns where to copy, or None."""
    from accelerate.data_loader import DataLoaderShard

    if not isinstance(loader, DataLoaderShard) or loader.device is None:
        return None
    device, loader.device = loader.device, None
    return device


def start_accelerator(cfg: Config, output_dir: Path, metrics: RunMetrics):
    """The Accelerator and the batch shape it makes (accumulation derived from an effective batch
    over its processes); the device and shape go into the metrics record. The seed is set after the
    tracker starts (Job.setup)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import GradientAccumulationPlugin

    cleanup.reset_accelerate()
    use_cpu = cfg.train.cpu or not torch.cuda.is_available()
    timeout = cfg.measure.collective_timeout_s  # at the group's creation, and on a group an earlier cell made
    num_processes = PartialState(
        cpu=use_cpu, **({"timeout": timedelta(seconds=timeout)} if timeout else {})
    ).num_processes
    if timeout:
        processes.set_collective_timeout(timeout)
    bs, ga, _ = resolve_batch(
        cfg.batch.batch_size, cfg.batch.gradient_accumulation_steps, cfg.batch.effective_batch_size, num_processes
    )
    acc = Accelerator(
        mixed_precision=str(cfg.train.mixed_precision),
        cpu=use_cpu,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=ga, sync_with_dataloader=False),
        **tracking.accelerator_kwargs(cfg.tracking, output_dir),
    )
    shape = BatchShape(None if cfg.batch.max_tokens else bs, ga, acc.num_processes, cfg.batch.max_tokens)
    metrics.device, metrics.num_processes = machine.device_name(acc.device), acc.num_processes
    metrics.gradient_accumulation_steps, metrics.effective_batch_size = ga, shape.effective
    return acc, shape


def prepared_parts(
    cfg: Config, acc, loaded, data: PreparedData, tokenizer, encoder: Encoder, shape: BatchShape
) -> Prepared:
    """The model `loaded` (models.LoadedModel), its optimizer and the loaders, prepared by Accelerate."""
    kind = cfg.model.kind
    widths = encoder.max_widths() if cfg.data.padding == "max_length" else (None, None)
    padded = Collator(tokenizer.pad_token_id, kind, loaded.decoder_start_token_id, *widths)
    collator = _packing(cfg, tokenizer.pad_token_id, data) if cfg.data.packing else padded
    cuda = acc.device.type == "cuda"  # workers collate the next batches while the GPU computes
    workers = cfg.data.num_workers if cfg.data.num_workers is not None else (2 if cuda else 0)
    loader_kw = dict(collate_fn=collator, num_workers=workers, pin_memory=cuda, persistent_workers=workers > 0)
    if shape.max_tokens is not None:  # micro-batches cut by padded positions, whole steps of them
        batches = token_batches(cfg, data.train_ds, collator, shape.max_tokens, shape.per_step, windowed=True)
        train_loader = torch.utils.data.DataLoader(data.train_ds, batch_sampler=batches, **loader_kw)
    else:
        sampler = EpochSampler(
            data.train_ds.lengths(),
            seed=cfg.train.seed,
            group_by_length=cfg.data.group_by_length,
            batch_size=shape.micro_batch,
            window=window(cfg, shape.effective),
        )
        # drop_last: every micro-batch is full, so every update sees exactly the effective batch
        # and per-step figures compare; the next epoch's permutation brings the dropped samples back.
        train_loader = torch.utils.data.DataLoader(
            data.train_ds, batch_size=shape.micro_batch, sampler=sampler, drop_last=True, **loader_kw
        )
    dev_loader = torch.utils.data.DataLoader(
        data.dev_ds, batch_size=cfg.batch.eval_batch_size, shuffle=False, **{**loader_kw, "collate_fn": padded}
    )
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    decay, no_decay = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    optimizer = build_optimizer(decay, no_decay, cfg.train, acc.device)
    launchers.before_prepare(acc, cfg.train.max_grad_norm, str(kind), str(cfg.model.quantization))
    prepared = acc.prepare(loaded.model, optimizer, train_loader, dev_loader)
    launchers.check_prepared(acc, shape.accumulation, cfg.train.max_grad_norm)  # what DeepSpeed's config may override
    if cfg.data.packing:  # on the model itself: does its attention keep packed samples apart?
        model = prepared[0]
        check_packed_rows_isolated(model, acc.unwrap_model(model).config, acc.device, cfg.model.attn_implementation)
    return Prepared(*prepared, collator)


def _packing(cfg: Config, pad_token_id: int, data: PreparedData) -> PackingCollator:
    """data.packing's collator; a row cap shorter than the longest training sample is refused."""
    longest, cap = max(data.train_ds.lengths()), cfg.data.max_packed_len
    if cap is not None and cap < longest:
        raise ConfigError(
            f"data.max_packed_len={cap} is shorter than the longest training sample ({longest} tokens): "
            f"raise it to at least {longest}, or leave it null (a micro-batch's samples in one row)"
        )
    return PackingCollator(pad_token_id, cap)


def schedule(cfg: Config, data: PreparedData, collator: Collator, shape: BatchShape) -> Schedule:
    """The run's optimizer steps (measure/train settings) and one full epoch's plan; a training set
    smaller than one effective batch is refused."""
    if shape.max_tokens is not None:
        return token_schedule(cfg, data.train_ds, collator, shape.max_tokens, shape.per_step)
    epoch = epoch_plan(data.train_ds, collator, cfg, shape.micro_batch, shape.accumulation, shape.processes)
    if epoch.optimizer_steps == 0:
        raise ConfigError(
            f"the effective batch {shape.effective} is larger than the training set "
            f"({len(data.train_ds)} samples): lower batch.batch_size or the accumulation, "
            f"or raise data.max_train_samples"
        )
    return Schedule(
        schedule_length(cfg, epoch.optimizer_steps, shape.effective),
        warmup_steps(cfg, shape.effective),
        epoch,
        shape.effective,
    )


def lr_scheduler(cfg: Config, acc, optimizer, total_steps: int):
    """Not prepared by Accelerate: stepped once per optimizer step, on every process; registered so
    that its position travels with a checkpoint."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.train.scheduler == "constant" else str(cfg.train.scheduler)
    scheduler = get_scheduler(
        name,
        optimizer,
        num_warmup_steps=math.ceil(cfg.train.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    acc.register_for_checkpointing(scheduler)
    return scheduler
