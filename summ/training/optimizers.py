"""The optimizer a run trains with (train.optimizer), and the name of the one it got.

- adamw: torch's AdamW, the fused kernel (one launch for all parameters, the HF Trainer's
  adamw_torch_fused) where the training device and every parameter allow it, else foreach
  (one kernel per operation over a list of tensors), else the per-parameter loop;
- adamw_fused: that kernel, or one line saying why it cannot run here; adamw_foreach: the foreach
  implementation (where torch has no such kernels for the device, its per-tensor fallback);
- adamw_8bit / paged_adamw_8bit: bitsandbytes' AdamW with 8-bit blockwise-quantized moments (for
  tensors of 4096+ elements; smaller ones keep 32-bit state). Paged: the state lives in CUDA
  unified memory and moves to host memory under pressure (the QLoRA paper's paged optimizer), so
  it needs CUDA: on the CPU bitsandbytes would silently run the unpaged one;
- adafactor: torch's Adafactor, a factored second moment (a row and a column per matrix) and no
  first moment: the smallest state.
Weight decay is decoupled in all of them and off for biases and norms. `said(optimizer)` names
what was built, read from the optimizer object itself (the run's `optimizer` figure).
"""

from __future__ import annotations

import importlib.util

import torch
from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices, _get_fused_kernels_supported_devices

from summ.errors import ConfigError


def build_optimizer(decay: list, no_decay: list, tcfg, device: torch.device) -> torch.optim.Optimizer:
    """train.optimizer over two groups: `decay` (weight decay) and `no_decay`; `device`: where it
    will step (the parameters may still be on the host). Refuses, with the setting to change, an
    implementation the device, the parameters or the installed packages cannot run."""
    name = str(tcfg.optimizer)
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    params = decay + no_decay
    if name in ("adamw", "adamw_fused", "adamw_foreach"):
        impl = _adamw_implementation(name, params, device)
        kw = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
        return torch.optim.AdamW(groups, lr=tcfg.learning_rate, eps=tcfg.adam_epsilon, **kw)
    if name == "adafactor":
        foreach = device.type in _get_foreach_kernels_supported_devices()
        return torch.optim.Adafactor(groups, lr=tcfg.learning_rate, foreach=foreach)
    return _bitsandbytes_adamw(name, groups, tcfg, device)


def _adamw_implementation(name: str, params: list, device: torch.device) -> str:
    fused_ok = device.type in _get_fused_kernels_supported_devices()
    odd = sorted({str(p.dtype) for p in params if not torch.is_floating_point(p)})
    if name == "adamw_fused":
        if not fused_ok:
            raise ConfigError(
                f"train.optimizer=adamw_fused: torch {torch.__version__} has no fused AdamW on {device.type}: "
                "use train.optimizer=adamw (it picks what the device has)"
            )
        if odd:
            raise ConfigError(
                f"train.optimizer=adamw_fused: fused AdamW steps floating-point parameters only, and this model "
                f"trains {', '.join(odd)} ones: use train.optimizer=adamw"
            )
        return "fused"
    if name == "adamw_foreach":  # runs everywhere: torch's per-tensor fallback where it has no such kernels
        return "foreach"
    if fused_ok and not odd:
        return "fused"
    return "foreach" if device.type in _get_foreach_kernels_supported_devices() else "for_loop"


def _bitsandbytes_adamw(name: str, groups: list, tcfg, device: torch.device) -> torch.optim.Optimizer:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"train.optimizer={name} needs bitsandbytes (pip install bitsandbytes), or use train.optimizer=adamw"
        )
    paged = name == "paged_adamw_8bit"
    if paged and device.type != "cuda":
        raise ConfigError(
            f"train.optimizer=paged_adamw_8bit pages optimizer state out of GPU memory, and this run trains on "
            f"{device.type}: use train.optimizer=adamw_8bit (the same 8-bit state, unpaged)"
        )
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
    return cls(groups, lr=tcfg.learning_rate, eps=tcfg.adam_epsilon)


def said(optimizer) -> str:
    """The optimizer as built, named from the object: adamw_fused, adamw_foreach, adamw_for_loop,
    adamw_8bit, paged_adamw_8bit, adafactor, or its class name (a launcher's own optimizer)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
    cls = type(inner)
    if cls is torch.optim.AdamW:
        d = inner.defaults
        return "adamw_fused" if d.get("fused") else "adamw_foreach" if d.get("foreach") else "adamw_for_loop"
    if cls is torch.optim.Adafactor:
        return "adafactor"
    if cls.__module__.startswith("bitsandbytes"):
        if cls.__name__ == "PagedAdamW8bit":
            return "paged_adamw_8bit"
        if cls.__name__ == "AdamW8bit":
            return "adamw_8bit"
    return cls.__name__
