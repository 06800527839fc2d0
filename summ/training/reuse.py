"""What the cells of one sweep share within a process (sweep.reuse_loaded): the prepared data and
the loaded model, so that a cell pays for its own steps and not for reading, tokenizing, loading
and quantizing again (a 3B model reloads and quantizes in tens of seconds).

Each cell still starts from a fresh process's state. The data is read-only once prepared. The
model is kept without LoRA adapters: a full fine-tune gets its weights back from a pristine copy
(kept in host memory), a LoRA cell gets new adapters initialised from the seed, and torch's RNG is
seeded as a fresh load leaves it (summ/modeling/models.py: with_adapters). Memory keeps its
meaning: the weights are resident before the cell's monitor starts, so the monitor adds them
(MemoryMonitor.weights_bytes), as a fresh process would count them.

One entry each, keyed by everything that shapes it; a cell whose key differs loads afresh and
replaces the entry. One cache per process: joblib and SLURM workers and each process of a
distributed launch keep their own. Sharded launches (FSDP, DeepSpeed) never reuse the model.
"""

from __future__ import annotations

import gc
import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from summ.config import Config
from summ.modeling import models

log = logging.getLogger(__name__)


def _key(*parts: Any) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def data_key(cfg: Config) -> str:
    """The data a run trains and evaluates on: source, fold, quality filter, augmentation, and
    the tokenizer and encoder that turned it into ids."""
    m = cfg.model
    return _key(
        cfg.data,
        cfg.train.fold,
        cfg.train.k_folds,
        cfg.train.fold_seed,
        cfg.augmentation,
        cfg.generation,
        m.kind,
        m.path,
        m.hub_id,
        m.tiny,
        m.prompt_template,
        m.trust_remote_code,
    )


def model_key(cfg: Config, device: torch.device, vocabulary: int) -> str:
    """The loaded model: weights, dtype, quantization, checkpointing, attention, LoRA shape, and
    the seed a tiny model is initialised from."""
    return _key(cfg.model, cfg.train.seed, str(device), vocabulary)


@dataclass
class KeptModel:
    key: str
    model: Any  # the base: unwrapped, no adapters
    pristine: dict | None  # full fine-tune: the weights as loaded, on the CPU
    weights_bytes: int


_data: tuple[str, Any] | None = None
_model: KeptModel | None = None


def take_data(key: str) -> Any | None:
    return _data[1] if _data is not None and _data[0] == key else None


def keep_data(key: str, data: Any) -> None:
    """Keep the data for later cells. Its objects are frozen out of the cycle collector
    (gc.freeze): the collections every cell runs would otherwise walk them all, a quarter of a
    second each beside 12,457 tokenized dialogues; dropped later, they are freed by reference counting."""
    global _data
    _data = (key, data)
    gc.collect()
    gc.freeze()


def take_model(key: str) -> KeptModel | None:
    """The kept model for `key`, its weights restored; None when there is none (then the caller
    loads afresh and the old one is dropped)."""
    global _model
    if _model is None or _model.key != key:
        drop_model()
        return None
    if _model.pristine is not None:
        with torch.no_grad():
            _model.model.load_state_dict(_model.pristine)
    return _model


def keep_model(key: str, base, full_fine_tune: bool) -> KeptModel:
    """Keep `base` (no adapters yet) for later cells; full fine-tunes also keep a pristine copy."""
    global _model
    pristine = {k: v.detach().to("cpu", copy=True) for k, v in base.state_dict().items()} if full_fine_tune else None
    _model = KeptModel(key, base, pristine, models.resident_bytes(base))
    return _model


def give_back(kept: KeptModel, trained) -> None:
    """After a cell: the model back to its kept form (accelerate's wrappers and LoRA adapters
    removed, gradients dropped). A model that cannot be restored is dropped instead."""
    try:
        model = trained
        if hasattr(model, "unload") and hasattr(model, "peft_config"):  # LoRA: adapters out, base weights untouched
            model = model.unload()
        for p in model.parameters():
            p.grad = None
        kept.model = model
    except Exception as exc:  # never reuse a model in an unknown state
        log.warning("the loaded model could not be kept for the next cell (%s): it will load afresh", exc)
        drop_model()


def kept_base(cfg: Config, tokenizer, device: torch.device) -> tuple[KeptModel, bool]:
    """(the kept model for this config with its weights restored, True), or (one loaded now, on the
    device, and kept, False)."""
    key = model_key(cfg, device, len(tokenizer))
    kept = take_model(key)
    if kept is not None:
        return kept, True
    base = models.load_base(cfg.model, tokenizer, cfg.train.seed, device)
    if cfg.model.quantization == "none":  # a quantized model was placed by bitsandbytes already
        base = base.to(device)
    return keep_model(key, base, full_fine_tune=not cfg.model.lora.enabled), False


def drop_model() -> None:
    global _model
    _model = None


def clear() -> None:
    """Forget everything kept (tests, and a process done with sweeps)."""
    global _data
    _data = None
    drop_model()
