"""What a sharding launcher (`accelerate launch` with DeepSpeed or FSDP) changes under the loop,
settled where the run is prepared: the loop's own figures (accumulation, clipping, the probe) must
mean what the cell asked for under every launcher.

- DeepSpeed takes the accumulation from its config: a number there overrides the cell's (Accelerate
  warns and uses DeepSpeed's), so cells of 2+ stepped every micro-batch while the loop, scheduler,
  loss normalisation and figures assumed otherwise. After `prepare` the accumulation Accelerate
  uses must be the cell's (`auto` in the config file gets it), or the run stops with one line.
- DeepSpeed clips inside its own step at its config's `gradient_clipping` (Accelerate's
  clip_grad_norm_ does nothing there): `auto` is set to train.max_grad_norm, another number must
  match it.
- The memory probe (a forward and backward of the worst batch, no update): under DeepSpeed,
  Accelerate's backward runs engine.step(), which would train once on the worst batch, and no_sync
  does nothing at ZeRO 2+; under FSDP, no_sync leaves the probe's gradients unreduced, to be added to
  the next synchronised backward. So under either the probe is skipped, and the run's memory record
  says so (memory.probe_skipped): the memory verdict covers the steps that ran.
- FSDP: what it cannot shard is refused before prepare (an encoder-decoder, bitsandbytes weights);
  saving gathers the full weights on every process (a collective) before process 0 writes them
  (loop.Job.save), and generation keeps the processes in step (inference/evaluate.py: generate).
"""

from __future__ import annotations

from summ.distributed import sharded_by
from summ.errors import ConfigError


def before_prepare(accelerator, max_grad_norm: float, kind: str, quantization: str) -> None:
    """DeepSpeed's `auto` clipping becomes train.max_grad_norm (0: none), before prepare reads it.
    FSDP refuses what it cannot shard: an encoder-decoder (Accelerate 1.16 groups BART's shared
    embedding with the LM head only, so the encoder's and decoder's copies of it sit in another
    group and the first forward fails: "shared with a parameter already managed by another FSDP
    group"), and bitsandbytes' packed 4-bit / 8-bit weights."""
    sharding = sharded_by(accelerator)
    if sharding == "fsdp" and kind == "seq2seq":
        raise ConfigError(
            "an encoder-decoder model (model.kind=seq2seq, KoBART) does not shard under FSDP: its "
            "tied embeddings land in two FSDP groups; launch it with accelerate_configs/ddp_gpus.yaml "
            "or deepspeed_zero2.yaml (KoBART's 124M parameters fit one GPU)"
        )
    if sharding == "fsdp" and quantization != "none":
        raise ConfigError(
            f"model.quantization={quantization} (bitsandbytes) does not shard under FSDP: launch QLoRA "
            f"with accelerate_configs/ddp_gpus.yaml, or set model.quantization=none"
        )
    if sharding != "deepspeed":
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = float(max_grad_norm)


def check_prepared(accelerator, accumulation: int, max_grad_norm: float) -> None:
    """After prepare: the accumulation Accelerate will use, and DeepSpeed's clipping, are the cell's."""
    used = accelerator.gradient_accumulation_steps
    if used != accumulation:
        raise ConfigError(
            f"the launcher's config sets gradient accumulation to {used} and this cell asks for "
            f"{accumulation} (batch.gradient_accumulation_steps): set gradient_accumulation_steps to "
            f"auto in the accelerate config file (accelerate_configs/deepspeed_zero2.yaml leaves it out)"
        )
    if sharded_by(accelerator) == "deepspeed":
        clip = accelerator.state.deepspeed_plugin.deepspeed_config.get("gradient_clipping")
        if clip not in ("auto", None) and float(clip) != float(max_grad_norm):
            raise ConfigError(
                f"DeepSpeed clips gradients at its config's gradient_clipping={clip} and "
                f"train.max_grad_norm={max_grad_norm}: set one to the other (or gradient_clipping: "
                f"auto in the accelerate config file)"
            )


def probe_skipped(accelerator) -> str | None:
    """Why the memory probe cannot run under this launcher without changing the training, or None."""
    kind = sharded_by(accelerator)
    if kind == "deepspeed":
        return (
            "DeepSpeed: its backward runs the optimizer step, so a probe would train on the worst batch; "
            "the memory figures cover the steps that ran"
        )
    if kind == "fsdp":
        return (
            "FSDP: gradients of a backward without synchronisation stay unreduced into the next step, so a "
            "probe would change the first update; the memory figures cover the steps that ran"
        )
    return None
