"""What the CUDA-only paths hand to torch and Accelerate, checked on the CPU (issue 20). Where a
mechanism is CUDA's own, the call contract is tested here (what reaches which torch.cuda call, and
in which order); benchmarks/gpu_check.py confirms the rest on a GPU."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch._utils import _get_device_index

from summ.measure import flops, machine, timing
from summ.measure.memory import BudgetGuard, MemoryMonitor

from .conftest import ROOT, cli, compose_cfg, free_port

# the recorder's global backward hook sees modules whose outputs are not tensors: torch says so
pytestmark = [
    pytest.mark.filterwarnings("ignore:For backward hooks to be called"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]
GIB = 2**30

# torch.cuda's calls that take a device, and whether torch lets it name no index (torch/cuda/
# memory.py and __init__.py: `_get_device_index(device, optional=True)`; False: it raises
# "Expected a torch.device with a specified index").
CUDA_CALLS = {
    "reset_peak_memory_stats": True,
    "memory_allocated": True,
    "memory_reserved": True,
    "max_memory_allocated": True,
    "max_memory_reserved": True,
    "memory_stats": True,
    "mem_get_info": True,
    "set_per_process_memory_fraction": False,
    "synchronize": True,
    "get_device_name": True,
    "get_device_properties": True,
    "list_gpu_processes": True,
}


def two_processes(script: Path, *args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`script` as two processes of one torch.distributed.run launch (gloo on the CPU)."""
    return cli(
        "--nproc_per_node",
        "2",
        "--master_port",
        free_port(),
        script,
        *args,
        module="torch.distributed.run",
        env=env,
        cwd=cwd,
    )


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's device calls, recorded: (name, device argument). Each refuses what the real one
    refuses (a device with no index where torch needs one), so a run gets past setup only if every
    call was given what torch takes. The current device is 1, so an index taken from it shows."""
    calls: list[tuple[str, object]] = []
    results = {
        "memory_allocated": 0,
        "memory_reserved": 0,
        "max_memory_allocated": 3 * GIB,
        "max_memory_reserved": 4 * GIB,
        "memory_stats": {"num_alloc_retries": 0, "num_ooms": 0},
        "mem_get_info": (70 * GIB, 80 * GIB),
        "get_device_name": "NVIDIA H100 80GB HBM3",
        "list_gpu_processes": "GPU:1\nno processes are running",
        "get_device_properties": SimpleNamespace(multi_processor_count=132),
    }

    def fake(name, optional):
        signature = inspect.signature(getattr(torch.cuda, name))

        def call(*args, **kwargs):
            device = signature.bind(*args, **kwargs).arguments.get("device")
            if not optional and not isinstance(device, int):
                _get_device_index(device)  # torch's own check: raises for torch.device("cuda")
            calls.append((name, device))
            return results.get(name)

        return call

    for name, optional in CUDA_CALLS.items():
        monkeypatch.setattr(torch.cuda, name, fake(name, optional))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    return calls


def test_a_cuda_device_with_no_index_reaches_every_torch_cuda_call_as_an_integer(fake_cuda):
    device = torch.device("cuda")  # what Accelerate hands a one-process run
    monitor = MemoryMonitor(device)
    monitor.start()
    guard = BudgetGuard(monitor, 24, 0.9)
    monitor.cap(guard.budget_bytes)  # raised "Expected a torch.device with a specified index" before
    monitor.peak_bytes(), monitor.reserved_peak_bytes(), monitor.segment(), monitor.pressure()
    monitor.capacity_bytes()
    monitor.stop()
    timing.synchronize(device)
    machine.device_name(device)
    machine.LoadWatch(device).start().finish()
    flops.peak_flops(device, "bf16", None)
    called = {name for name, _ in fake_cuda}
    assert called == set(CUDA_CALLS), set(CUDA_CALLS) - called
    assert all(arg == 1 and isinstance(arg, int) for _, arg in fake_cuda), fake_cuda  # the current device's
    assert [c[0] for c in fake_cuda].count("set_per_process_memory_fraction") == 2  # the cap, and its release
    assert MemoryMonitor(torch.device("cuda", 3)).index == 3  # a device that names its index keeps it


def test_a_run_with_a_budget_on_a_device_with_no_index_gets_past_setup(fake_cuda, tmp_path):
    """The memory setup of a run (Job.setup's MemoryStretches: the monitor, the budget and its cap) on
    Accelerate's `cuda` device."""
    from omegaconf import OmegaConf

    from summ.training.instruments import MemoryStretches

    cfg = compose_cfg(["measure.memory_budget_gb=24"])
    memory = MemoryStretches(OmegaConf.to_object(cfg), torch.device("cuda"))
    assert memory.guard.budget_bytes == 24 * GIB and memory.monitor.capped
    (fraction,) = [c for c in fake_cuda if c[0] == "set_per_process_memory_fraction"]
    assert fraction[1] == 1
    memory.monitor.stop()


# --------------------------------------------------------------------------- the step clock


def test_the_step_clock_waits_for_the_device_before_every_read(monkeypatch):
    order = []
    monkeypatch.setattr(timing, "synchronize", lambda device: order.append("sync"))
    monkeypatch.setattr(timing, "now", lambda: order.append("now") or float(len(order)))
    clock = timing.StepClock(torch.device("cpu"))
    clock.start()
    assert clock.lap() == 2.0 and order == ["sync", "now", "sync", "now"]


def _check_no_window_opens_on_queued_work(events: list, steps: int, warmup: int) -> None:
    """Every clock read follows a synchronize that follows the last work queued before it; the
    first measured step's window is opened after the probe's work; every step closes with a lap."""
    pending = False  # work queued since the last synchronize
    last = None
    assert events.count("probe-end") == 1 and events.count("load") == steps - warmup
    for e in events:
        if e == "work":
            pending = True
        elif e == "sync":
            pending = False
        elif e == "start" or isinstance(e, list):
            assert not pending, "a step clock read while work was still queued on the device"
        elif e == "load":
            assert isinstance(last, list), "the machine's load was read inside a step's window"
        last = e
    probe_end = events.index("probe-end")
    after = events[probe_end:]
    # the probe's time is a lap of the clock (its work done on the device); the first measured
    # step's window opens after it, before any work of that step
    assert after[1] == "sync" and isinstance(after[2], list) and after[3:5] == ["sync", "start"], after[:8]
    assert after.index("work") > 4
    assert len([e for e in events[:probe_end] if isinstance(e, list)]) == warmup  # the probe follows the warm-up
    assert len(step_laps(events)) == steps, (step_laps(events), steps)


def step_laps(events: list) -> list[float]:
    """The seconds of each training step: every lap of the clock but the probe's."""
    probe_lap = events.index("probe-end") + 2
    return [e[1] for i, e in enumerate(events) if isinstance(e, list) and i != probe_lap]


def test_no_measured_step_starts_while_probe_or_warmup_work_is_queued(run_job, monkeypatch):
    from . import record_clock

    record_clock.events.clear()
    monkeypatch.setattr(timing, "synchronize", timing.synchronize)  # restored after the test
    monkeypatch.setattr(timing.StepClock, "start", timing.StepClock.start)
    monkeypatch.setattr(timing.StepClock, "lap", timing.StepClock.lap)
    from summ.training import loop

    monkeypatch.setattr(loop, "probe_memory", loop.probe_memory)
    handles = record_clock.install()
    try:
        m, out = run_job("measure.steps=3", "measure.warmup_steps=2", "eval.enabled=false")
    finally:
        for handle in handles:
            handle.remove()
    events = record_clock.events
    assert m["status"] == "ok", m["error"]
    _check_no_window_opens_on_queued_work(events, steps=5, warmup=2)
    history = [json.loads(line) for line in (out / "train_history.jsonl").read_text().splitlines()]
    assert [h["step_time_s"] for h in history] == step_laps(events)


@pytest.mark.slow
def test_no_measured_step_starts_while_probe_or_warmup_work_is_queued_on_two_processes(tmp_path):
    proc = two_processes(
        ROOT / "tests" / "record_clock.py",
        f"hydra.run.dir={tmp_path / 'run'}",
        "measure.steps=3",
        "measure.warmup_steps=2",
        "eval.enabled=false",
        "train.save_model=false",
        cwd=tmp_path,
        env={"SUMM_TEST_EVENTS": str(tmp_path / "events"), "ACCELERATE_USE_CPU": "true"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        events = json.loads((tmp_path / "events" / f"rank{rank}.json").read_text())
        _check_no_window_opens_on_queued_work(events, steps=5, warmup=2)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["num_processes"] == 2


AGREE = """
import json, os, sys
from accelerate import Accelerator
from summ.training import processes
acc = Accelerator(cpu=True)
peak = [3 * 2**30, 5 * 2**30 + 7][acc.process_index]  # past 32 bits, different on each process
signal = [0, 15][acc.process_index]
with open(sys.argv[1] + f"/rank{acc.process_index}.json", "w") as fh:
    json.dump(processes.agree(acc, peak, signal), fh)
acc.wait_for_everyone()
os._exit(0)  # gloo's teardown at exit aborts now and then on these 2 cores: the result is written
"""


@pytest.mark.slow
def test_two_processes_with_different_peaks_agree_on_the_larger(tmp_path):
    """Accelerator.reduce(reduction="max") is a maximum (accelerate>=1.15; before 1.14 it summed:
    two GPUs each 45% full read 90% and every step ended over budget)."""
    (tmp_path / "agree.py").write_text(AGREE)
    proc = two_processes(tmp_path / "agree.py", str(tmp_path), env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [5 * 2**30 + 7, 15]


# --------------------------------------------------------------------------- vocabulary rows


@pytest.mark.parametrize("model", ["tiny_bart", "tiny_llama"])
def test_the_vocabulary_is_padded_to_64_rows_and_generation_never_emits_a_padding_row(model, run_job):
    from omegaconf import OmegaConf

    from summ.config import InferenceConfig, ModelKind
    from summ.inference.evaluate import generation_config
    from summ.modeling import models

    m, out = run_job(f"model={model}", "measure.steps=1", "eval.enabled=false", "train.save_model=true")
    assert m["status"] == "ok", m["error"]
    c = OmegaConf.to_object(compose_cfg([f"model={model}"]))
    tok = models.load_tokenizer(c.model)
    # what a run saves (a full fine-tune) or builds its base from (LoRA, QLoRA: the tiny weights folder)
    folder = out / "model" if model == "tiny_bart" else Path(models.tiny_weights_dir(c.model, tok, c.train.seed))
    saved = json.loads((folder / "config.json").read_text())["vocab_size"]
    loaded = models.load(c.model, tok, 0, torch.device("cpu")).model.eval()
    rows = models.vocabulary_rows(loaded)
    assert rows % 64 == 0 and len(tok) < rows < len(tok) + 64 and saved == rows, (rows, saved, len(tok))
    # the padding rows made the most likely ids: 500 sampled steps must still never emit one
    head = loaded.get_output_embeddings()
    head.register_forward_hook(lambda mod, args, logits: logits.index_fill(-1, torch.arange(len(tok), rows), 30.0))
    kind = ModelKind.seq2seq if model == "tiny_bart" else ModelKind.causal
    prompts = torch.randint(5, len(tok), (10, 12))
    inputs = {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}
    sampling = InferenceConfig(name="sampling", num_beams=1, do_sample=True, max_new_tokens=50)

    def generated(vocabulary):
        gen = generation_config(sampling, tok, kind, vocabulary)
        gen.min_new_tokens = 50  # no early end: 10 x 50 = 500 sampled steps
        torch.manual_seed(0)
        with torch.no_grad():
            ids = loaded.generate(**inputs, generation_config=gen)
        return ids[:, -50:]

    new = generated(rows)
    assert new.numel() == 500 and int(new.max()) < len(tok)
    assert int((generated(None) >= len(tok)).sum()) > 250  # without the suppression they would be emitted


def test_the_real_models_vocabularies_grow_to_a_multiple_of_64():
    """Llama-3.2's 128,256 ids and KoBART's 30,000, each with the 15 masked tokens (at model width 8)."""
    from transformers import BartConfig, BartForConditionalGeneration, LlamaConfig, LlamaForCausalLM

    from summ.modeling import models

    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128256,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    bart = BartForConditionalGeneration(
        BartConfig(
            vocab_size=30000,
            d_model=8,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=16,
            decoder_ffn_dim=16,
        )
    )
    for model, ids, rows in ((llama, 128256 + 15, 128320), (bart, 30000 + 15, 30016)):
        models.fit_vocabulary(model, range(ids))  # anything with the tokenizer's length
        assert models.vocabulary_rows(model) == model.config.vocab_size == rows
        assert model.get_input_embeddings().num_embeddings == rows


TIMEOUT = """
import json, os, sys, time
from accelerate import Accelerator, PartialState
from summ.distributed import out_of_step
from summ.training import processes
PartialState(cpu=True)  # a group made with torch's default timeout (30 minutes on gloo), as an earlier cell's
processes.set_collective_timeout(2)  # what the next cell sets
acc = Accelerator(cpu=True)
result = {}
if acc.process_index == 0:
    started = time.monotonic()
    try:
        processes.agree(acc, 1, 0)  # process 1 never comes
    except RuntimeError as exc:
        result = {"seconds": time.monotonic() - started, "out_of_step": out_of_step(exc), "error": str(exc)[:200]}
else:
    time.sleep(8)
with open(sys.argv[1] + f"/rank{acc.process_index}.json", "w") as fh:
    json.dump(result, fh)
os._exit(0)  # a group whose collective timed out may abort in its destructor: the result is written
"""


@pytest.mark.slow
def test_a_collective_another_process_never_reaches_fails_after_the_timeout(tmp_path):
    """measure.collective_timeout_s on a process group made before the run (a sweep's earlier cell)."""
    (tmp_path / "timeout.py").write_text(TIMEOUT)
    proc = two_processes(tmp_path / "timeout.py", str(tmp_path), env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    waited = json.loads((tmp_path / "rank0.json").read_text())
    assert waited["out_of_step"] and 1.5 < waited["seconds"] < 6, waited


# --------------------------------------------------------------------------- smaller contracts


@pytest.mark.parametrize(
    "listing,others",
    [
        (
            lambda me: f"GPU:0\nprocess {me:>10} uses 1234.000 MB GPU memory\nprocess 99999 uses 900.000 MB GPU memory",
            1,
        ),
        (lambda me: f"GPU:0\nprocess {me:>10} uses 1234.000 MB GPU memory", 0),
        # in a container NVML lists host PIDs: this process is not there under its own, nothing can be matched
        (lambda me: "GPU:0\nprocess    4183221 uses 1234.000 MB GPU memory", None),
    ],
)
def test_other_gpu_processes_count_only_where_this_process_is_listed(monkeypatch, listing, others):
    monkeypatch.setattr(torch.cuda, "list_gpu_processes", lambda device: listing(os.getpid()))
    assert machine.other_gpu_processes(torch.device("cuda", 0)) == others


def test_a_checkpoint_is_renamed_only_after_every_process_has_written_its_part(tmp_path):
    """Accelerate's save_state writes each process's RNG state (and sharded weights) from every
    process; process 0 renames the folder: not before the others are done."""
    from summ.training import checkpoint

    seen = []

    class Accelerator:
        is_main_process = True

        def save_state(self, folder, safe_serialization=True):
            Path(folder).mkdir(parents=True)
            seen.append(("save_state", Path(folder).name))

        def wait_for_everyone(self):
            folder = tmp_path / "checkpoints"
            seen.append(("barrier", sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []))

    checkpoint.save(Accelerator(), tmp_path, 4, {"epoch": 0, "batches": 8}, [], 2, "identity")
    saved = seen.index(("save_state", ".step_4.tmp"))
    assert seen[saved + 1] == ("barrier", [".step_4.tmp"])  # everyone done, before the rename
    assert (tmp_path / "checkpoints" / "step_4").is_dir()


# --------------------------------------------------------------------------- launchers (DeepSpeed, FSDP)


class _Launched(SimpleNamespace):
    """An Accelerator as a launcher leaves it after prepare (distributed_type, accumulation, plugin)."""


def _deepspeed(accumulation, **plugin_kwargs):
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    plugin = DeepSpeedPlugin(zero_stage=2, **plugin_kwargs)
    return _Launched(
        distributed_type=DistributedType.DEEPSPEED,
        gradient_accumulation_steps=accumulation,
        state=SimpleNamespace(deepspeed_plugin=plugin),
    )


def test_a_launcher_that_overrides_the_cells_accumulation_stops_the_run_with_one_line():
    """accelerate 1.16 accelerator.py (_prepare_deepspeed): a number in DeepSpeed's config wins over
    the GradientAccumulationPlugin's, with a warning: the cell of 2 would step every micro-batch."""
    from summ.errors import ConfigError
    from summ.training import launchers

    acc = _deepspeed(1, gradient_accumulation_steps=1)  # what prepare left: DeepSpeed's value
    with pytest.raises(ConfigError, match="sets gradient accumulation to 1 and this cell asks for 2") as info:
        launchers.check_prepared(acc, 2, 1.0)
    assert "\n" not in str(info.value) and "auto" in str(info.value)
    launchers.check_prepared(_deepspeed(2), 2, 1.0)  # auto: filled with the cell's


def test_deepspeed_clips_where_train_max_grad_norm_says():
    from summ.errors import ConfigError
    from summ.training import launchers

    acc = _deepspeed(1)  # the shipped config: gradient_clipping auto
    launchers.before_prepare(acc, 0.5, "causal", "none")
    assert acc.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] == 0.5
    launchers.check_prepared(acc, 1, 0.5)
    with pytest.raises(ConfigError, match=r"gradient_clipping=1.0 and train.max_grad_norm=0.5"):
        launchers.check_prepared(_deepspeed(1, gradient_clipping=1.0), 1, 0.5)


def test_the_shipped_deepspeed_config_fixes_neither_accumulation_nor_clipping(monkeypatch):
    import yaml
    from accelerate.utils import DeepSpeedPlugin

    shipped = yaml.safe_load((ROOT / "accelerate_configs" / "deepspeed_zero2.yaml").read_text())
    assert not {"gradient_accumulation_steps", "gradient_clipping"} & set(shipped["deepspeed_config"])
    for name in ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "ACCELERATE_GRADIENT_CLIPPING"):
        monkeypatch.delenv(name, raising=False)  # what accelerate launch sets only from the config's keys
    config = DeepSpeedPlugin(zero_stage=shipped["deepspeed_config"]["zero_stage"]).deepspeed_config
    assert config["gradient_accumulation_steps"] == config["gradient_clipping"] == "auto"


def test_the_probe_is_skipped_under_deepspeed_and_fsdp_and_metrics_say_why(run_job, monkeypatch):
    from accelerate.utils import DistributedType

    from summ.training import launchers

    assert "optimizer step" in launchers.probe_skipped(_deepspeed(1))
    assert "unreduced" in launchers.probe_skipped(_Launched(distributed_type=DistributedType.FSDP))
    assert launchers.probe_skipped(_Launched(distributed_type=DistributedType.MULTI_GPU)) is None
    reason = launchers.probe_skipped(_deepspeed(1))
    monkeypatch.setattr(launchers, "probe_skipped", lambda acc: reason)  # a run as a DeepSpeed launch leaves it
    m, _ = run_job("measure.steps=2", "eval.enabled=false")
    assert m["status"] == "ok" and m["memory"]["probe_skipped"] == reason
    assert m["memory"]["probe_peak_bytes"] is None and m["train"]["probe_seconds"] is None


def test_fsdp_refuses_what_it_cannot_shard_before_prepare():
    """Accelerate 1.16 selects FSDP only on GPU-like devices (accelerate/state.py: the FSDP branch
    is under MULTI_GPU, MULTI_XPU, ...; on the CPU every FSDP setting quietly gives DDP), so these
    contracts are tested with an Accelerator as an FSDP launch leaves it."""
    from accelerate.utils import DistributedType

    from summ.errors import ConfigError
    from summ.training import launchers

    fsdp = _Launched(distributed_type=DistributedType.FSDP)
    with pytest.raises(ConfigError, match="does not shard under FSDP: its tied embeddings"):
        launchers.before_prepare(fsdp, 1.0, "seq2seq", "none")
    with pytest.raises(ConfigError, match=r"model.quantization=4bit \(bitsandbytes\) does not shard"):
        launchers.before_prepare(fsdp, 1.0, "causal", "4bit")
    launchers.before_prepare(fsdp, 1.0, "causal", "none")
    launchers.before_prepare(_Launched(distributed_type=DistributedType.MULTI_GPU), 1.0, "seq2seq", "4bit")


def test_under_fsdp_every_process_gathers_the_weights_and_process_0_saves_them(tmp_path, monkeypatch):
    """get_state_dict under FSDP is a collective (accelerate 1.16 accelerator.py: get_model_state_dict
    with full_state_dict and cpu_offload): a process 0 that gathered alone waited for good, and
    save_pretrained of the sharded parameters themselves fails ("invalid python storage")."""
    from accelerate.utils import DistributedType

    from summ.training import loop

    calls = []
    for rank, main in ((0, True), (1, False)):
        job = loop.Job.__new__(loop.Job)
        weights = {"w": torch.zeros(2)}
        accelerator = _Launched(
            distributed_type=DistributedType.FSDP,
            is_main_process=main,
            get_state_dict=lambda model, r=rank, w=weights: calls.append(("gather", r)) or w,
            wait_for_everyone=lambda r=rank: calls.append(("barrier", r)),
        )
        job.cfg = SimpleNamespace(train=SimpleNamespace(save_model=True))
        job.metrics, job.output_dir = SimpleNamespace(), tmp_path
        job.start_step, job.timing = 0, SimpleNamespace(timer=SimpleNamespace(steps_seen=3))
        job.run = SimpleNamespace(
            accelerator=accelerator,
            model=object(),
            tokenizer=object(),
            shape=SimpleNamespace(micro_batch=1, accumulation=1),
        )
        monkeypatch.setattr(
            loop,
            "save_for_predict",
            lambda acc, model, tok, cfg, target, state, r=rank, w=weights: calls.append(("save", r, state is w)),
        )
        job.save(job.run)
    assert calls == [("gather", 0), ("save", 0, True), ("barrier", 0), ("gather", 1), ("barrier", 1)]


def test_under_fsdp_generation_keeps_every_process_in_step(monkeypatch):
    """Every forward of a sharded model is a collective: each process makes as many generate()
    calls as the others (split with padding) and steps until the longest sequence of all is done."""
    from accelerate.utils import DistributedType

    from summ.config import InferenceConfig, ModelKind
    from summ.data.samples import Sample
    from summ.inference import evaluate
    from summ.modeling import models

    split, generated = [], []

    class Model(torch.nn.Module):
        config = SimpleNamespace(get_text_config=lambda: SimpleNamespace(vocab_size=4032))

        def get_output_embeddings(self):
            return None

        def generate(self, **kwargs):
            generated.append(kwargs.get("synced_gpus"))
            return torch.zeros(kwargs["input_ids"].size(0), kwargs["input_ids"].size(1) + 2, dtype=torch.long)

    class Accelerator(SimpleNamespace):
        import contextlib

        @contextlib.contextmanager
        def split_between_processes(self, items, apply_padding=False):
            split.append(apply_padding)
            yield items[: (len(items) + 1) // 2] if not apply_padding else items[:2]

        def autocast(self):
            import contextlib

            return contextlib.nullcontext()

    # this is process 0; process 1's summaries come back with the gather
    monkeypatch.setattr(evaluate, "gather_object", lambda objects: objects + [{i: "x" for i in range(3)}])
    acc = Accelerator(
        distributed_type=DistributedType.FSDP,
        num_processes=2,
        device=torch.device("cpu"),
        unwrap_model=lambda model: model,
    )
    tok = models.tiny_tokenizer()
    encoder = SimpleNamespace(prompt_ids=lambda dialogue: [5, 6, 7])
    samples = [Sample(f"f{i}", "#Person1#: 안녕하세요", "요약") for i in range(3)]
    evaluate.generate(
        acc, Model(), samples, encoder, tok, InferenceConfig(name="greedy", num_beams=1), ModelKind.causal, 1
    )
    assert split == [True] and generated and all(generated)
