"""FLOPs of one training micro-step, and the utilisation figures built on them.

- Model FLOPs: the forward and backward the model needs, counted once, no recompute from gradient
  checkpointing. Per padded position they estimate the cost of one token, so
  `train.flops_per_token` x non-pad tokens/s / peak is MFU (model FLOPs utilisation).
- Hardware FLOPs: everything the device executed, recompute included, per padded position; times
  padded positions/s over the peak it is HFU (padding and recompute are work the device did).

Counted by torch's FlopCounterMode on one warm-up micro-batch, with formulas added for what it
cannot see into: the bitsandbytes 4-bit and 8-bit matmuls (one op each that dequantizes and
multiplies inside) and attention on the CPU. A matmul [M, K] x [K, N] is 2 x M x N x K FLOPs;
bias adds and (de)quantization are not counted (torch's own convention). Recompute is the FLOPs a
checkpointed layer adds when it runs again during backward (RecomputeMeter).

The device's peak comes from a table by device name (the most specific name first) and the
precision the matmuls compute in: mixed precision, else the quantization's compute dtype, else the
weights' dtype. None where the device or the precision is not in the table (then no MFU).
"""

from __future__ import annotations

import functools
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from summ.measure.devices import cuda_index

# Dense peak TFLOP/s by device name: (fp32 without tensor cores, fp16, bf16); None where the device
# cannot do it. Vendor data sheets, without sparsity. The most specific name comes first.
PEAK_TFLOPS = (
    ("GH200", (67.0, 989.0, 989.0)),  # its Hopper GPU is an H100 SXM's
    ("H200 NVL", (60.0, 835.0, 835.0)),
    ("H200", (67.0, 989.0, 989.0)),
    ("H100 NVL", (60.0, 835.0, 835.0)),
    ("H100 PCIe", (51.0, 756.0, 756.0)),
    ("H100", (67.0, 989.0, 989.0)),  # SXM
    ("H800 PCIe", (51.0, 756.0, 756.0)),
    ("H800", (67.0, 989.0, 989.0)),  # SXM: an H100's compute, less NVLink and FP64
    ("B200", (80.0, 2250.0, 2250.0)),  # HGX B200 at 1,000 W
    ("A100", (19.5, 312.0, 312.0)),
    ("L40S", (91.6, 362.0, 362.0)),
    ("L40", (90.5, 181.0, 181.0)),
    ("L4", (30.3, 121.0, 121.0)),
    ("A10G", (31.2, 70.0, 70.0)),
    ("A10", (31.2, 125.0, 125.0)),
    ("RTX 4090", (82.6, 165.2, 165.2)),
    ("RTX 3090", (35.6, 71.0, 71.0)),
    ("V100", (15.7, 125.0, None)),  # no bf16
    ("T4", (8.1, 65.0, None)),  # no bf16
)
_PRECISION_COLUMN = {"fp32": 0, "fp16": 1, "bf16": 2}
# The whole GPU's streaming multiprocessors, for the GPUs that can be split into MIG slices: a slice
# (named "... MIG 3g.40gb") has the table's peak times its own SMs over these.
FULL_GPU_SMS = (
    ("GH200", 132),
    ("H200", 132),
    ("H100 PCIe", 114),
    ("H100", 132),
    ("H800 PCIe", 114),
    ("H800", 132),
    ("B200", 148),
    ("A100", 108),
    ("A30", 56),
)


def compute_precision(mixed_precision: str, quantization: str, dtype: str) -> str:
    """What the matmuls compute in: fp16/bf16 autocast, else a quantized model's compute dtype (NF4
    and LLM.int8 dequantize to bf16 / fp16), else the weights' own dtype."""
    if mixed_precision in ("fp16", "bf16"):
        return mixed_precision
    if quantization == "4bit":
        return "bf16"  # bnb_4bit_compute_dtype (summ/modeling/models.py)
    if quantization == "8bit":
        return "fp16"
    return {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "fp32")


def _named(name: str, table) -> Any | None:
    """The first row of `table` whose name is in `name` as a whole word (most specific first)."""
    for fragment, value in table:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(fragment)}(?![A-Za-z0-9])", name):
            return value
    return None


def device_peak_tflops(name: str, precision: str, sms: int | None = None) -> float | None:
    """The table's peak for a device name, or None (unknown device, or a precision it lacks). A MIG
    slice has its share by streaming multiprocessors (`sms`: the slice's own count); None where the
    whole GPU's count is not known."""
    peaks = _named(name, PEAK_TFLOPS)
    if peaks is None or peaks[_PRECISION_COLUMN[precision]] is None:
        return None
    peak = peaks[_PRECISION_COLUMN[precision]]
    if re.search(r"(?<![A-Za-z0-9])MIG(?![A-Za-z0-9])", name):
        full = _named(name, FULL_GPU_SMS)
        if full is None or not sms:
            return None
        return peak * min(sms, full) / full
    return peak


def peak_flops(device: torch.device, precision: str, configured_tflops: float | None) -> float | None:
    """FLOP/s the device can do at best, or None where unknown (then MFU is null)."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    index = cuda_index(device)
    tflops = device_peak_tflops(
        torch.cuda.get_device_name(index), precision, torch.cuda.get_device_properties(index).multi_processor_count
    )
    return tflops * 1e12 if tflops else None


# --------------------------------------------------------------------------- formulas


def _rows(a_shape) -> int:
    """M: every leading dimension of the activation, flattened."""
    return math.prod(a_shape[:-1])


def _gemm_4bit(A, B, shapeB, *args, out_shape=None, **kwargs) -> int:
    """bitsandbytes::gemm_4bit(A[..., K], B packed, shapeB=[N, K], ...): N and K from shapeB (B's
    own shape is the packed storage)."""
    return 2 * _rows(A) * shapeB[0] * shapeB[1]


def _int8_mm(A, B, *args, out_shape=None, **kwargs) -> int:
    """bitsandbytes::int8_linear_matmul / int8_scaled_mm(A int8 [..., K], B int8 [N, K], ...)."""
    return 2 * _rows(A) * B[0] * A[-1]


def _int8_mixed_mm(A, CA, CB, *args, out_shape=None, **kwargs) -> int:
    """bitsandbytes::int8_mixed_scaled_mm(A, CA int8 [M, K], CB int8 [N, K], ...): LLM.int8() with
    outliers; the outlier columns are part of K (their extra fp16 addmm is not counted)."""
    return 2 * _rows(CA) * CB[0] * CA[-1]


def _sdpa_cpu(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def custom_mapping() -> dict:
    """Formulas for FlopCounterMode(custom_mapping=...), keyed by op packet (covers .default and
    .out). Only the outer ops are mapped: an op called inside another op's kernel never reaches
    the counter, so the bitsandbytes matmuls count once. Their ops exist once bitsandbytes is
    imported, which a quantized model has done; a run without one does not pay its import (seconds)."""
    return _mapping("bitsandbytes" in sys.modules)


@functools.lru_cache(maxsize=2)
def _mapping(with_bitsandbytes: bool) -> dict:  # the flag keys the cache: bitsandbytes' ops appear on import
    wanted = {
        ("bitsandbytes", "gemm_4bit"): _gemm_4bit,
        ("bitsandbytes", "gemv_4bit"): _gemm_4bit,
        ("bitsandbytes", "int8_linear_matmul"): _int8_mm,
        ("bitsandbytes", "int8_scaled_mm"): _int8_mm,
        ("bitsandbytes", "int8_mixed_scaled_mm"): _int8_mixed_mm,
        ("aten", "_scaled_dot_product_flash_attention_for_cpu"): _sdpa_cpu,
        ("aten", "_scaled_dot_product_flash_attention_for_cpu_backward"): _sdpa_cpu_backward,
    }
    mapping = {}
    for (namespace, name), formula in wanted.items():
        try:
            mapping[getattr(getattr(torch.ops, namespace), name)] = formula
        except (AttributeError, RuntimeError):  # not installed, or a version without the op
            pass
    return mapping


# --------------------------------------------------------------------------- one micro-step


class RecomputeMeter:
    """While active, the FLOPs that gradient checkpointing recomputes are booked apart: each
    module with `_gradient_checkpointing_func` (transformers' checkpointed layers) runs its layer
    function through a marker; a run of it while autograd executes a backward graph task
    (torch._C._current_graph_task_id() != -1, as torch's ModuleTracker tells backward) is the
    recompute, and the counter's total is read around it."""

    def __init__(self, model: torch.nn.Module, counter) -> None:
        self.model, self.counter, self.flops = model, counter, 0
        self._patched: list[tuple[torch.nn.Module, Any, bool]] = []

    def _mark(self, fn: Callable) -> Callable:
        def run(*args, **kwargs):
            if torch._C._current_graph_task_id() == -1:  # the forward: model FLOPs
                return fn(*args, **kwargs)
            before = self.counter.get_total_flops()
            try:
                return fn(*args, **kwargs)
            finally:
                self.flops += self.counter.get_total_flops() - before

        return run

    def __enter__(self) -> RecomputeMeter:
        for module in self.model.modules():
            original = getattr(module, "_gradient_checkpointing_func", None)
            if original is None:
                continue

            def wrapped(fn, *args, _original=original, **kwargs):
                return _original(self._mark(fn), *args, **kwargs)

            self._patched.append((module, original, "_gradient_checkpointing_func" in module.__dict__))
            module._gradient_checkpointing_func = wrapped
        return self

    def __exit__(self, *exc) -> None:
        for module, original, own in self._patched:
            if own:
                module._gradient_checkpointing_func = original
            else:
                del module._gradient_checkpointing_func
        self._patched.clear()


@dataclass
class MicroStepProfile:
    """Exact, device-independent figures for one micro-batch."""

    model_flops: int = 0  # forward and backward, no recompute
    hardware_flops: int = 0  # everything executed, recompute included
    activation_bytes: int = 0  # tensors saved for backward (parameters excluded), each storage once
    positions: int = 0  # padded positions the micro-batch had

    @property
    def flops_per_token(self) -> float | None:
        return self.model_flops / self.positions if self.positions else None

    @property
    def hardware_flops_per_position(self) -> float | None:
        return self.hardware_flops / self.positions if self.positions else None


class ProfileMicroStep:
    """Context manager: counts the model and hardware FLOPs and the saved-activation bytes of the
    forward and backward run inside it. `model`: whose parameters are not activations, and whose
    checkpointed layers' recompute is booked apart; None counts every saved tensor and no recompute."""

    def __init__(self, model: torch.nn.Module | None = None, positions: int = 0) -> None:
        self.model = model
        self.profile = MicroStepProfile(positions=positions)
        self._storages: set[int] = set()

    def _pack(self, t: torch.Tensor):
        try:
            key = t.untyped_storage().data_ptr()
            if key not in self._storages:
                self._storages.add(key)
                self.profile.activation_bytes += t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
            pass
        return t

    def __enter__(self) -> ProfileMicroStep:
        from torch.utils.flop_counter import FlopCounterMode

        if self.model is not None:  # a weight saved for backward is the model's, not an activation
            for p in self.model.parameters():
                try:
                    self._storages.add(p.untyped_storage().data_ptr())
                except (RuntimeError, NotImplementedError):
                    pass
        self._flops = FlopCounterMode(display=False, custom_mapping=custom_mapping())
        self._recompute = RecomputeMeter(self.model, self._flops) if self.model is not None else None
        self._saved = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        if self._recompute is not None:
            self._recompute.__enter__()
        self._flops.__enter__()
        self._saved.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._saved.__exit__(*exc)
        self._flops.__exit__(*exc)
        if self._recompute is not None:
            self._recompute.__exit__(*exc)
        total = int(self._flops.get_total_flops())
        recompute = self._recompute.flops if self._recompute is not None else 0
        self.profile.hardware_flops, self.profile.model_flops = total, total - recompute
