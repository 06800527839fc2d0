"""A trained model as mode=predict finds it: saved by a training run into <run dir>/model
(weights or the LoRA adapter alone, the tokenizer, and the run's resolved config), then located
from model.path and loaded for inference, quantized as asked. Weights only from safetensors."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from summ.config import Config, ModelConfig
from summ.errors import WeightsNotFound
from summ.files import atomic_write_text
from summ.modeling import models
from summ.modeling.checks import check_tokenizer, from_pretrained_checked
from summ.run_folder import MODEL_DIR, SAVED_CONFIG


def save_for_predict(accelerator, model, tokenizer, cfg: Config, target: Path, state_dict: dict | None = None) -> None:
    """Weights (the LoRA adapter alone for peft models, safetensors), tokenizer and resolved config,
    all or nothing: written into a temporary folder beside `target`, renamed when complete. A full
    disk is one line (WriteFailed) and leaves no partial folder; an earlier `target` stays whole.
    `state_dict`: the full weights where the model's own are sharded (FSDP: gathered by every
    process beforehand; save_pretrained cannot read a sharded parameter's storage)."""
    import shutil

    from summ.files import WriteFailed, make_folder, new_file_mode

    tmp, old = target.with_name(f".{target.name}.tmp"), target.with_name(f".{target.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    make_folder(target.parent, for_file=target)
    try:
        accelerator.unwrap_model(model).save_pretrained(
            tmp, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {})
        )
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / SAVED_CONFIG, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        for path in tmp.rglob("*"):  # safetensors writes its files 0600: the weights get the umask's mode too
            if path.is_file():
                path.chmod(new_file_mode())
        if target.exists():
            target.replace(old)
        tmp.replace(target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            old.replace(target)
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, OSError) or "os error" in text or "No space left" in text:  # safetensors' own errors too
            raise WriteFailed(f"cannot write {target}: {getattr(exc, 'strerror', None) or text}") from exc
        raise
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class Trained:
    model_cfg: ModelConfig  # the architecture and prompt the weights were trained with
    weights_dir: Path
    adapter: bool  # a LoRA adapter over model_cfg's base weights
    seed: int  # builds a tiny model's random base exactly as training did


def locate(cfg: Config) -> Trained:
    """The trained model behind model.path: a run folder, its model/ folder, or plain weights."""
    path = Path(cfg.model.path).expanduser()
    for folder in (path / MODEL_DIR, path):
        if (folder / SAVED_CONFIG).is_file():
            return locate_folder(folder)
    if (path / "config.json").is_file():
        models.check_json(path / "config.json", "model.path")
        return Trained(copy.deepcopy(cfg.model), path, False, cfg.train.seed)
    if (path / "adapter_config.json").is_file():
        raise WeightsNotFound(
            f"model.path={cfg.model.path} holds a LoRA adapter without {SAVED_CONFIG}: point "
            f"model.path at the training run's folder, which names the base model"
        )
    members = sorted(p.name for p in path.glob("fold_*") if (p / MODEL_DIR / SAVED_CONFIG).is_file())
    if members:
        raise WeightsNotFound(
            f"model.path={cfg.model.path} is a K-fold run: each member's model is in fold_<k>/; "
            f"predict with one (model.path={path / members[0]}), or ensemble their predictions "
            f"with summ-ensemble"
        )
    raise WeightsNotFound(
        f"model.path={cfg.model.path} holds no trained model: give a training run's folder "
        f"(saved with train.save_model=true) or a folder with config.json and *.safetensors"
    )


def locate_folder(folder: Path) -> Trained:
    """A folder written by save_for_predict."""
    try:
        run_cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(folder / SAVED_CONFIG))
    except Exception as exc:  # a damaged or foreign file: YAML or schema errors
        raise WeightsNotFound(
            f"{folder / SAVED_CONFIG} is unreadable ({str(exc).splitlines()[0]}): point "
            f"model.path at an intact training run"
        ) from None
    if (folder / "config.json").is_file():
        models.check_json(folder / "config.json", "model.path")
    model_cfg: ModelConfig = OmegaConf.to_object(run_cfg.model)
    adapter = (folder / "adapter_config.json").is_file()
    weights = "adapter_model.safetensors" if adapter else "*.safetensors"
    if not list(folder.glob(weights)):
        raise WeightsNotFound(
            f"{folder} has no {weights}: weights load only from safetensors; re-save them "
            f"with save_pretrained(safe_serialization=True)"
        )
    return Trained(model_cfg, folder, adapter, int(run_cfg.train.seed))


def load_for_inference(trained: Trained, tok, device: torch.device, quantization: str):
    """The trained model in eval mode, quantized as asked. Weights only from safetensors."""
    mc = trained.model_cfg  # (dynamic_int8 on CUDA is refused by summ.validation)
    quant = (
        models.bitsandbytes_config(quantization[4:], "inference.quantization")
        if quantization.startswith("bnb_")
        else None
    )
    if trained.adapter:  # the base the adapter was trained on
        base_cfg = copy.deepcopy(mc)
        base_cfg.lora.enabled, base_cfg.quantization = False, "none"
        source = models.tiny_weights_dir(base_cfg, tok, trained.seed) if mc.tiny else models.weights_source(base_cfg)
    else:
        source = str(trained.weights_dir)
    kwargs: dict[str, Any] = dict(
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=mc.trust_remote_code,
        dtype=models.torch_dtype(mc.dtype),
    )
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": device})
    auto = models.auto_class(mc.kind)
    try:
        model = from_pretrained_checked(
            auto,
            source,
            f"model.path={trained.weights_dir}"
            if not trained.adapter
            else f"the base of the adapter in {trained.weights_dir} ({source})",
            **kwargs,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise WeightsNotFound(
            f"{source} has no safetensors weights ({str(exc).splitlines()[0]}): "
            f"re-save them with save_pretrained(safe_serialization=True)"
        ) from None
    models.fit_vocabulary(model, tok)
    if trained.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(trained.weights_dir))
        if quant is None:  # merged: one matmul per layer again, as fast as the base model
            model = model.merge_and_unload()
    if quant is None:
        model = model.to(device)
    if quantization == "dynamic_int8":
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():  # torch marks the eager-mode API deprecated; it still ships
            warnings.simplefilter("ignore")
            model = quantize_dynamic(model.float(), {torch.nn.Linear}, dtype=torch.qint8)
    model.eval()
    model.config.use_cache = True
    return model


def load_saved_tokenizer(trained: Trained):
    """The tokenizer saved beside the weights (masked tokens already special), else the model's."""
    if not (trained.weights_dir / "tokenizer_config.json").is_file():
        return models.load_tokenizer(trained.model_cfg)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(trained.weights_dir), local_files_only=True)
    check_tokenizer(tok, f"model.path={trained.weights_dir}")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def model_bytes(model) -> int:
    """Bytes of the weights as held for inference (int8 packed, 4-bit, or float)."""
    total = 0
    for value in model.state_dict().values():
        for t in value if isinstance(value, tuple) else (value,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total
