"""summ: measure what each batch configuration costs per sample when fine-tuning Korean dialogue summarizers."""

import os

# torch's CPU allocator puts tensors of 2 MiB and more on transparent huge pages when this is set
# before its first allocation (c10/core/alloc_cpu.cpp reads it once). The CPU memory accounting
# (measure.cpu_live_memory) hands every freed tensor back to the kernel, so each new one is fresh
# pages: a page fault per 4 KiB cost CPU training 1.4-1.6x, one per 2 MiB about 7%
# (BENCHMARKS.md §10). summ/measure/memory.py: huge_pages_in_force says whether it took effect.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
