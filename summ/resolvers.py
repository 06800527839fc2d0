"""The schemas in Hydra's ConfigStore and the configs' resolvers, registered once at start-up
(summ.app.register). Apart from summ/config.py, which the torch-free reports import: a resolver
here may ask the device (torch)."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from summ.config import Config, run_name, threads_per_job
from summ.distributed import now


def register_configs() -> None:
    """The schemas in Hydra's ConfigStore (conf/config.yaml lists `schema` first), the configs' resolvers."""
    ConfigStore.instance().store(name="schema", node=Config, replace=True)
    OmegaConf.register_resolver("summ_precisions", precision_choices, replace=True)
    OmegaConf.register_resolver("summ_optimizers", optimizer_choices, replace=True)
    OmegaConf.register_resolver("summ_packing", packing_choices, replace=True)
    OmegaConf.register_resolver("summ_packed_attention", packed_attention, replace=True)
    # ${summ_now:FORMAT}: like Hydra's ${now:}, but one time for the whole launch: every job of a
    # sweep (which resolves hydra.sweep.dir once per job) and every process of a distributed launch
    OmegaConf.register_resolver("summ_now", now, replace=True)
    OmegaConf.register_resolver("summ_run_name", run_name, replace=True)
    OmegaConf.register_resolver("summ_threads_per_job", threads_per_job, replace=True)


def optimizer_choices() -> str:
    """train.optimizer values this machine can run, as an Optuna sweeper choice: bitsandbytes'
    8-bit ones where it is installed, its paged one on CUDA only (refused elsewhere)."""
    import importlib.util

    import torch

    values = ["adamw", "adafactor"]
    if importlib.util.find_spec("bitsandbytes") is not None:
        values.append("adamw_8bit")
        if torch.cuda.is_available():
            values.append("paged_adamw_8bit")
    return f"choice({','.join(values)})"


def packing_choices(kind) -> str:
    """data.packing values a model kind can train with (packing is refused for all but causal LMs)."""
    return "choice(true,false)" if str(kind) == "causal" else "choice(false)"


def packed_attention(packing, compile, cpu=False) -> str | None:
    """model.attn_implementation for one trial of a search over data.packing (preset=optuna_levers):
    a packed trial takes an attention that skips the whole-row scores (README, "Packing"):
    flash_attention_2 on CUDA (not train.cpu) where flash-attn is installed, else sdpa_varlen, which
    train.compile cannot take (refused together): a compiled packed trial runs sdpa. null
    (transformers' default) for the rest."""
    import importlib.util

    import torch

    if not packing:
        return None
    if not cpu and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None if compile else "sdpa_varlen"


def precision_choices() -> str:
    """Mixed-precision values this device can train with, as an Optuna sweeper choice."""
    import torch

    values = ["no", "bf16"]  # bf16 autocast runs on CPUs too
    if torch.cuda.is_available():
        values = ["no", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    return f"choice({','.join(values)})"
