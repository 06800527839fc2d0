"""The device index torch.cuda's calls take.

Accelerate hands a one-process run `torch.device("cuda")`, with no index. Some torch.cuda calls
take that and mean the current device (`_get_device_index(device, optional=True)`: memory_allocated,
mem_get_info, synchronize); others refuse it (`set_per_process_memory_fraction` raises "Expected a
torch.device with a specified index"). So the index is resolved once, here, and every torch.cuda
call of summ is given an integer: the device's own index, else the current device's.
"""

from __future__ import annotations

import torch


def cuda_index(device: torch.device) -> int:
    """The index of a CUDA `device` (the current device where it names none)."""
    if device.type != "cuda":
        raise ValueError(f"{device} is not a CUDA device")
    return device.index if device.index is not None else torch.cuda.current_device()
