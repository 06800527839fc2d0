"""Measurement: the one definition of every reported cost figure (timing.py: time and
throughput; memory.py: peak memory and the budget; flops.py: FLOPs and MFU; machine.py: the
device and what else ran on it)."""
