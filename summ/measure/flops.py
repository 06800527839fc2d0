"""FLOPs and model FLOPs utilisation.

FLOPs are counted by torch's FlopCounterMode on one warm-up micro-batch (forward and backward,
matmuls and attention, recompute from checkpointing included) per padded position, times padded
positions/s, over the device's peak FLOP/s for the precision in use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# Dense peak TFLOP/s by device-name fragment: (fp32 without tensor cores, bf16/fp16 tensor cores).
# Vendor data sheets; the SXM figure where a card comes in several forms. First match wins.
PEAK_TFLOPS = (
    ("H200", (67.0, 989.0)),
    ("H100", (67.0, 989.0)),
    ("A100", (19.5, 312.0)),
    ("L40S", (91.6, 362.0)),
    ("L4", (30.3, 121.0)),
    ("A10G", (31.2, 70.0)),
    ("A10", (31.2, 125.0)),
    ("RTX 4090", (82.6, 165.0)),
    ("RTX 3090", (35.6, 71.0)),
    ("V100", (15.7, 125.0)),
    ("T4", (8.1, 65.0)),
)


def peak_flops(device: torch.device, precision: str, configured_tflops: Optional[float]) -> Optional[float]:
    """FLOP/s the device can do at best, or None where unknown (then MFU is null)."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, (fp32, half) in PEAK_TFLOPS:
        if fragment in name:
            return (half if precision in ("bf16", "fp16") else fp32) * 1e12
    return None


@dataclass
class MicroStepProfile:
    """Exact, device-independent figures for one micro-batch."""

    flops: int = 0
    activation_bytes: int = 0  # tensors saved for backward, each storage counted once
    tokens: int = 0


class ProfileMicroStep:
    """Context manager: counts FLOPs and saved-activation bytes of the forward+backward inside it."""

    def __init__(self) -> None:
        self.profile = MicroStepProfile()
        self._storages: set[int] = set()

    def _pack(self, t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in self._storages:
                self._storages.add(key)
                self.profile.activation_bytes += storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
            pass
        return t

    def __enter__(self) -> "ProfileMicroStep":
        from torch.utils.flop_counter import FlopCounterMode

        self._flops = FlopCounterMode(display=False)
        self._saved = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._flops.__enter__()
        self._saved.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._saved.__exit__(*exc)
        self._flops.__exit__(*exc)
        self.profile.flops = int(self._flops.get_total_flops())
