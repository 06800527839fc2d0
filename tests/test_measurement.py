"""Numbers a batch decision can rest on, checked from outside the code that produced them: every
cell measures the same samples, memory is judged at the worst batch and never at evaluation's,
FLOPs count the 4-bit matmuls and not the recompute, peaks come from the right device row, OOMs
raised without a type are OOMs, and a busy machine is said."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from summ import failpoints
from summ.data.sampler import EpochSampler, Window
from summ.measure import flops
from summ.measure.machine import LoadWatch
from summ.measure.memory import is_oom, kernel_allows_huge_pages
from summ.training.outcome import classify

from .conftest import cli, compose_cfg

SYNTHETIC = ["data=synthetic", "data.synthetic_train_size=800", "eval.enabled=false", "train.save_model=false"]
CELLS = [(2, 1), (4, 1), (8, 1), (2, 2), (4, 2)]


# --------------------------------------------------------------------------- the same work in every cell


def test_a_window_draws_the_same_samples_whatever_the_split_or_the_grouping():
    lengths = [(i * 37) % 301 + 5 for i in range(1000)]
    sets = set()
    for bs in (2, 4, 8, 16):
        for grouped in (False, True):
            order = EpochSampler(
                lengths, seed=3, group_by_length=grouped, batch_size=bs, window=Window(warmup=64, measured=192)
            ).order(0)
            assert len(order) == 256
            sets.add((frozenset(order[:64]), frozenset(order[64:])))
    assert len(sets) == 1  # the same warm-up samples, the same measured samples


def test_grouped_batches_are_shuffled_and_a_partial_batch_stays_last():
    lengths = [(i * 37) % 301 + 5 for i in range(1003)]
    sampler = EpochSampler(lengths, seed=0, group_by_length=True, batch_size=8)
    order = sampler.order(0)
    assert sorted(order) == list(range(1003))
    batches = [order[i : i + 8] for i in range(0, 1000, 8)]
    widths = [max(lengths[j] for j in b) for b in batches]
    assert widths[0] != max(widths) or widths[1] != sorted(widths)[-2]  # not longest-first
    spread = [max(lengths[j] for j in b) - min(lengths[j] for j in b) for b in batches]
    assert sum(spread) / len(spread) < 10  # still grouped: little padding inside a batch
    assert len(order[1000:]) == 3  # the partial batch is last, where drop_last drops it


@pytest.mark.parametrize("grouped", ["false", "true"])
def test_cells_of_a_sweep_measure_identical_samples_and_tokens(run_job, grouped):
    seen = set()
    for bs, ga in CELLS:
        m, _ = run_job(
            *SYNTHETIC,
            f"batch.batch_size={bs}",
            f"batch.gradient_accumulation_steps={ga}",
            f"data.group_by_length={grouped}",
            "measure.samples=96",
            "measure.warmup_samples=32",
            "measure.memory_probe=false",
            "measure.cpu_live_memory=false",
            fast=False,
        )
        assert m["status"] == "ok"
        seen.add((m["train"]["samples"], m["train"]["tokens"]))
    assert len(seen) == 1 and next(iter(seen))[0] == 96


# --------------------------------------------------------------------------- memory


def _cli_metrics(folder, *overrides) -> dict:
    cli(f"hydra.run.dir={folder}", *overrides, timeout=600, code=0)
    return json.loads((folder / "metrics.json").read_text())


@pytest.mark.slow
def test_the_probe_bounds_an_epochs_observed_peak(tmp_path):
    """A trial's peak (the worst of its steps and a probe at the widest samples) against the peak
    a full epoch of the same config reaches, on the CPU's resident set. Each in a fresh process, as
    a user runs them: a long-lived test process's fragmented heap would creep into either figure."""
    common = [*SYNTHETIC, "batch.batch_size=8", "data.synthetic_train_size=400"]
    trial = _cli_metrics(tmp_path / "trial", *common, "measure.samples=96", "measure.warmup_samples=32")
    epoch = _cli_metrics(tmp_path / "epoch", *common, "train.epochs=1", "measure.memory_probe=false")
    mem = trial["memory"]
    assert mem["peak_bytes"] == max(mem["observed_peak_bytes"], mem["probe_peak_bytes"])
    assert mem["peak_bytes"] >= 0.95 * epoch["memory"]["observed_peak_bytes"]


def test_evaluation_memory_is_not_judged_against_the_training_budget(run_job):
    """Beam search over a large evaluation batch peaks above training at micro-batch 2: a budget
    between the two lets the cell finish ok, with both peaks recorded."""
    cfg = [
        "batch.batch_size=2",
        "batch.eval_batch_size=64",
        "train.max_steps=4",
        "eval.generate=true",
        "inference.num_beams=8",
        "data.max_eval_samples=30",
        "train.save_model=false",
    ]
    first, _ = run_job(*cfg, fast=False)
    train_peak, eval_peak = first["memory"]["peak_bytes"], first["memory"]["eval_peak_bytes"]
    assert eval_peak > 1.3 * train_peak, (train_peak, eval_peak)
    budget_gb = (train_peak + eval_peak) / 2 / 0.9 / 2**30
    second, _ = run_job(*cfg, f"measure.memory_budget_gb={budget_gb}", fast=False)
    assert second["status"] == "ok" and second["memory"]["eval_peak_bytes"] > second["memory"]["limit_bytes"]


def test_allocation_failures_raised_without_a_type_are_oom(run_job, monkeypatch):
    for text in (
        "CUDA error: out of memory",
        "CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)",
        "DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes",
        # NCCL's, as ProcessGroupNCCL raises them (DistBackendError is a RuntimeError)
        "NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error (run with NCCL_DEBUG=INFO for details), "
        "NCCL version 2.21.5\nncclUnhandledCudaError: Call to CUDA function failed.\nLast error:\n"
        "Cuda failure 'out of memory'",
        "Cuda failure 2 'out of memory'",
        "NCCL error: unhandled system error\nncclSystemError: System call failed.\nLast error:\nout of memory",
    ):
        assert is_oom(RuntimeError(text)) and classify(RuntimeError(text), "train")[0] == "oom"
    assert not is_oom(RuntimeError("shape mismatch")) and not is_oom(ValueError("out of memory"))
    assert not is_oom(RuntimeError("NCCL error: invalid usage")) and issubclass(
        torch.distributed.DistBackendError, RuntimeError
    )

    # the failpoint's error as a cuBLAS or caching allocator raises it: a RuntimeError with its message
    monkeypatch.setattr(failpoints.Failpoint, "error", lambda self, where: RuntimeError("CUDA error: out of memory"))
    m, _ = run_job("measure.steps=3", failpoint="error@backward:step=3")
    assert m["status"] == "oom" and "CUDA error: out of memory" in m["error"]


# --------------------------------------------------------------------------- FLOPs and peaks


def _flops_per_token(run_job, *extra):
    m, _ = run_job("model=tiny_llama", "measure.steps=1", "measure.warmup_steps=1", *extra)
    return m["train"]["flops_per_token"], m["train"]["hardware_flops_per_position"]


def test_qlora_counts_the_4bit_matmuls_and_model_flops_leave_out_recompute(run_job):
    plain, _ = _flops_per_token(run_job)
    quantized, _ = _flops_per_token(run_job, "model.quantization=4bit")
    assert quantized == pytest.approx(plain, rel=0.05)
    ckpt_model, ckpt_hardware = _flops_per_token(run_job, "model.gradient_checkpointing=true")
    assert ckpt_model == pytest.approx(plain, rel=0.02)  # no recompute in model FLOPs
    assert ckpt_hardware > 1.1 * ckpt_model  # the recompute is hardware work


@pytest.mark.parametrize(
    "name,precision,tflops",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H100 NVL", "fp16", 835.0),
        ("NVIDIA H200", "bf16", 989.0),
        ("NVIDIA L40", "bf16", 181.0),
        ("NVIDIA L40S", "bf16", 362.0),
        ("NVIDIA L4", "bf16", 121.0),
        ("NVIDIA RTX A1000", "bf16", None),
        ("NVIDIA A100-SXM4-80GB", "fp32", 19.5),
        ("Tesla V100-SXM2-16GB", "bf16", None),
        ("Tesla T4", "bf16", None),
        ("Tesla T4", "fp16", 65.0),
        ("NVIDIA A10G", "bf16", 70.0),
        ("NVIDIA A10", "bf16", 125.0),
        ("NVIDIA B200", "bf16", 2250.0),
        ("NVIDIA GH200 480GB", "bf16", 989.0),
        ("NVIDIA H800", "bf16", 989.0),
        ("NVIDIA H800 PCIe", "fp16", 756.0),
        ("NVIDIA H200 NVL", "bf16", 835.0),
    ],
)
def test_the_peak_comes_from_the_most_specific_device_row(name, precision, tflops):
    assert flops.device_peak_tflops(name, precision) == tflops


def test_a_mig_slice_gets_its_share_of_the_peak_by_its_streaming_multiprocessors():
    # A100: 108 SMs; a 3g.40gb slice has 42. H100 SXM: 132; a 1g.10gb slice has 16.
    assert flops.device_peak_tflops("NVIDIA A100-SXM4-80GB MIG 3g.40gb", "bf16", 42) == pytest.approx(312 * 42 / 108)
    assert flops.device_peak_tflops("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "bf16", 16) == pytest.approx(989 * 16 / 132)
    assert flops.device_peak_tflops("NVIDIA A100-SXM4-80GB MIG 3g.40gb", "bf16", None) is None  # no count: no MFU
    assert flops.device_peak_tflops("NVIDIA L4 MIG 1g.6gb", "bf16", 10) is None  # the whole GPU's count unknown


def test_the_peak_precision_is_the_one_the_matmuls_compute_in():
    for preset in ("llama", "qwen3_4b", "solar_10_7b", "polyglot_ko_12_8b", "kullm_v2"):
        c = OmegaConf.to_object(compose_cfg([f"model={preset}", "model.path=/x"]))
        assert (
            flops.compute_precision(str(c.train.mixed_precision), str(c.model.quantization), str(c.model.dtype))
            == "bf16"
        )
    assert flops.compute_precision("no", "none", "float32") == "fp32"
    assert flops.compute_precision("fp16", "none", "float32") == "fp16"


def test_saved_activations_do_not_count_parameters():
    """Weights that autograd saves for backward (a tied output projection, say) are the model's,
    not activations: they leave the activation figure."""
    from summ.modeling import models

    cfg = OmegaConf.to_object(compose_cfg([]))
    model = models.load(cfg.model, models.load_tokenizer(cfg.model), 0, torch.device("cpu")).model
    ids = torch.randint(5, 1000, (4, 64))
    dec = ids[:, :16].contiguous()
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec, labels=dec.clone())
    seen = []
    for owner in (None, model):
        with flops.ProfileMicroStep(owner, positions=4 * 80) as profiler:
            model(**batch).loss.backward()
        seen.append(profiler.profile.activation_bytes)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert seen[0] - seen[1] >= 0.5 * weights and seen[1] > 0


# --------------------------------------------------------------------------- a busy machine is said


def test_a_busy_machine_is_said():
    spin = "import time\nend = time.time() + 30\nwhile time.time() < end: pass\n"
    hogs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2)]
    try:
        time.sleep(0.5)
        watch = LoadWatch(torch.device("cpu")).start()
        for _ in range(20):
            watch.sample()
            time.sleep(0.02)
        machine = watch.finish()
    finally:
        for h in hogs:
            h.kill()
    assert machine["busy"] and machine["other_runnable_threads_mean"] >= 1
    from summ.reports.summary import busy_warning

    assert "busy machine" in busy_warning(machine)


def test_the_cpu_allocator_setting_is_said_and_switches_back(run_job):
    """measure.cpu_live_memory=false keeps glibc's heap (fast; the peak counts what it kept), and
    says so in memory.source; the next run with the default hands freed tensors back again."""
    from summ.measure import memory

    kept, _ = run_job("measure.cpu_live_memory=false", "train.max_steps=3", "measure.memory_probe=false")
    assert kept["status"] == "ok" and kept["memory"]["source"].endswith("_heap_kept")
    assert memory.tensors_off_the_heap() is not True  # glibc's own thresholds (never set in this process, or set back)
    live, _ = run_job("measure.cpu_live_memory=true", "train.max_steps=3", "measure.memory_probe=false")
    assert live["memory"]["source"] == "cpu_peak_rss_above_baseline" and memory.tensors_off_the_heap() is True


@pytest.mark.skipif(not kernel_allows_huge_pages(), reason="the kernel's transparent huge pages are off")
def test_large_cpu_tensors_go_on_huge_pages_when_summ_is_imported_before_torch_allocates():
    """summ sets THP_MEM_ALLOC_ENABLE on import (the live memory accounting's page faults, 1.4x on
    4 KiB pages); torch reads it once, at its first allocation, so an allocation before summ's
    import leaves 4 KiB pages, and huge_pages_in_force says which it got."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}  # only summ's own setting
    said = "from summ.measure import memory; print(memory.huge_pages_in_force())"
    for first, expected in (("import summ, torch; ", "True"), ("import torch; torch.zeros(1); ", "False")):
        out = subprocess.run([sys.executable, "-c", first + said], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split()[-1] == expected, first


def test_accounting_on_4kib_pages_is_said_once(monkeypatch, caplog):
    from summ.measure import memory

    monkeypatch.setattr(memory, "_HUGE_PAGES", False)
    monkeypatch.setattr(memory, "_WARNED_SMALL_PAGES", False)
    for _ in range(2):
        memory.MemoryMonitor(torch.device("cpu"), cpu_live_memory=True).start().stop()
    said = [r.message for r in caplog.records if "4 KiB pages" in r.message]
    assert len(said) == 1 and "measure.cpu_live_memory=false" in said[0]


def test_busy_is_judged_over_the_worst_stretch_not_the_mean(monkeypatch):
    """Issue 21, item 18: another job overlapped the last quarter of a run; the mean of other
    runnable threads was 0.32 (not busy), the worst quarter about 1.3 (busy on 2 cores)."""
    from summ.measure import machine

    monkeypatch.setattr(machine, "cores", lambda: 2)
    watch = LoadWatch(torch.device("cpu")).start()
    watch.others_runnable = [0] * 30 + [1, 2, 1, 1, 2, 1, 1, 2, 1, 2]  # 40 steps, the last 10 contended
    record = watch.finish()
    assert record["other_runnable_threads_mean"] < 0.5 and record["other_runnable_threads_worst_stretch"] >= 1.0
    assert record["busy"]
    watch.others_runnable = [0, 1, 0, 0, 0, 0, 1, 0, 0, 0] * 4  # a spike now and then: the machine's own noise
    assert not watch.finish()["busy"]
    assert machine.worst_stretch([]) is None and machine.worst_stretch([2]) == 2
    assert machine.worst_stretch([0, 0, 3, 3, 3, 0]) == 3  # 6 samples: a stretch of 3


def test_a_headline_outside_its_own_interval_is_said():
    from summ.reports.summary import outside_warning

    text = outside_warning({"samples_per_s": 18.0, "samples_per_s_interval": [30.4, 75.9]})
    assert "lies below the middle half of its own steps' rates (30.4-75.9)" in text
    assert outside_warning({"samples_per_s": 40.0, "samples_per_s_interval": [30.4, 75.9]}) is None
    assert outside_warning({"samples_per_s": 40.0}) is None
