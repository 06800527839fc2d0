"""The device a run measures on, and what else ran on it."""
from __future__ import annotations

import os

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"
