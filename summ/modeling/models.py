"""Models and tokenizers for training: tiny random-init models of the real architectures (tests,
CPU runs), real models from a local path or the local HF cache, LoRA and QLoRA through peft and
bitsandbytes. A trained model saved for mode=predict: summ/modeling/saved.py."""

from __future__ import annotations

import functools
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from summ.config import ModelConfig, ModelKind
from summ.data.samples import MASKED_TOKENS, bundled_sample_dir, read_csv
from summ.errors import ConfigError, WeightsNotFound
from summ.modeling import varlen
from summ.modeling.checks import check_tokenizer, from_pretrained_checked

TINY_VOCAB_SIZE = 4000
# Embedding and output rows are padded to a multiple of 64 when the vocabulary grows (the 15 masked
# tokens take Llama-3.2 to 128,271 rows and KoBART to 30,015): the logits matmul, often a step's
# largest, then tiles onto tensor cores without a ragged edge (NVIDIA's matmul guidance). The rows
# past the tokenizer's are never generated (summ/inference/evaluate.py: generation_config).
VOCAB_MULTIPLE = 64


def padded_vocabulary(n: int) -> int:
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


TINY_SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
MASKED_SPLIT = re.compile(r"#[A-Za-z]+\d*#:?")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    kind: ModelKind
    decoder_start_token_id: int | None
    trainable_params: int
    total_params: int


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    """A BPE tokenizer trained on the bundled sample (deterministic, well under a second)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    folder = bundled_sample_dir()
    # Merges are learned from the text between the masked tokens only: the tokens themselves are
    # special (never split), so merges across them would waste the vocabulary.
    texts = [
        piece
        for f in ("train.csv", "dev.csv")
        for s in read_csv(folder / f, need_summary=True)
        for t in (s.dialogue, s.summary)
        for piece in MASKED_SPLIT.split(t)
        if piece.strip()
    ]
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.normalizer = normalizers.NFC()
    # "first": only the start of the text gets the word marker, so "#Person1#은" decodes unsplit
    tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tk.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE, special_tokens=TINY_SPECIAL + MASKED_TOKENS, show_progress=False
    )
    tk.train_from_iterator(texts, trainer=trainer)
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> $B </s>",
        special_tokens=[("<s>", tk.token_to_id("<s>")), ("</s>", tk.token_to_id("</s>"))],
    )
    return tk.to_str()


def tiny_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        clean_up_tokenization_spaces=False,
    )
    tok.add_special_tokens({"additional_special_tokens": MASKED_TOKENS})
    return tok


def attention(cfg: ModelConfig) -> str | None:
    """model.attn_implementation as transformers takes it (None: its default); summ's own
    sdpa_varlen (summ/modeling/varlen.py) registered with transformers first."""
    if cfg.attn_implementation == varlen.NAME:
        varlen.register()
    return str(cfg.attn_implementation) if cfg.attn_implementation else None


def attention_built(model) -> str | None:
    """The attention implementation a loaded model runs (its config's, through a PEFT wrapper)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def tiny_model(cfg: ModelConfig, tok, seed: int):
    t = cfg.tiny
    torch.manual_seed(seed)
    vocab = padded_vocabulary(max(len(tok), t.vocab_size or 0))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype(cfg.dtype) if cfg.dtype != "float16" else torch.float32)
    try:
        return _build_tiny(t, tok, vocab, attention(cfg))
    finally:
        torch.set_default_dtype(previous)


def _build_tiny(t, tok, vocab: int, attention: str | None = None):
    """The tiny architecture from its config; `attention`: model.attn_implementation (None: transformers')."""

    def build(cls, conf):
        return cls._from_config(conf, attn_implementation=attention) if attention else cls(conf)

    if t.arch == "bart":
        from transformers import BartConfig, BartForConditionalGeneration

        conf = BartConfig(
            vocab_size=vocab,
            d_model=t.d_model,
            encoder_layers=t.layers,
            decoder_layers=t.layers,
            encoder_attention_heads=t.heads,
            decoder_attention_heads=t.heads,
            encoder_ffn_dim=t.ffn_dim,
            decoder_ffn_dim=t.ffn_dim,
            max_position_embeddings=t.max_positions,
            dropout=t.dropout,
            attention_dropout=t.dropout,
            activation_dropout=t.dropout,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.eos_token_id,
            forced_eos_token_id=tok.eos_token_id,
        )
        return build(BartForConditionalGeneration, conf)
    if t.arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        conf = LlamaConfig(
            vocab_size=vocab,
            hidden_size=t.d_model,
            intermediate_size=t.ffn_dim,
            num_hidden_layers=t.layers,
            num_attention_heads=t.heads,
            num_key_value_heads=t.kv_heads,
            max_position_embeddings=t.max_positions,
            attention_dropout=t.dropout,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=True,
        )
        return build(LlamaForCausalLM, conf)
    raise ConfigError(f"model.tiny.arch={t.arch} is unknown: choose bart or llama")


_TINY_WEIGHTS: dict[tuple, tempfile.TemporaryDirectory] = {}


def tiny_weights_dir(cfg: ModelConfig, tok, seed: int) -> str:
    """A random-init tiny model saved once per process and architecture (a sweep's jobs share it:
    a 3B-shaped model takes minutes to initialise and write)."""
    key = (repr(cfg.tiny), cfg.kind, cfg.dtype, len(tok), seed)
    if key not in _TINY_WEIGHTS:
        tmp = tempfile.TemporaryDirectory(prefix="summ-tiny-")
        model = tiny_model(cfg, tok, seed)
        model.save_pretrained(tmp.name)
        del model
        _TINY_WEIGHTS[key] = tmp
    return _TINY_WEIGHTS[key].name


def auto_class(kind: ModelKind):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if kind == ModelKind.seq2seq else AutoModelForCausalLM


# Weights load only from safetensors: a pickled checkpoint (pytorch_model.bin, *.pt) can run code.
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
RESAVE_HINT = (
    "re-save them as safetensors (load once in a trusted session, then "
    "save_pretrained(DIR, safe_serialization=True)) and run with model.path=DIR"
)


def weights_source(cfg: ModelConfig) -> str:
    """Where from_pretrained reads: model.path, or the hub id in the local cache. Never the network.
    Either must hold config.json and safetensors weights; anything else stops here, before the
    tokenizer, the data or the model load."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
            path = path / "model"  # a training run's folder: the weights it saved
        if not (path / "config.json").is_file():
            raise WeightsNotFound(
                f"model.path={cfg.path} has no config.json: point model.path at a folder "
                f"with config.json, the tokenizer and *.safetensors weights"
            )
        check_json(path / "config.json", "model.path")
        if not any(path.glob("*.safetensors")):
            pickled = sorted(f.name for pattern in PICKLED_WEIGHTS for f in path.glob(pattern))
            found = f"only {', '.join(pickled)}" if pickled else "no weights"
            raise WeightsNotFound(
                f"model.path={cfg.path} has {found}, and weights load only from safetensors: {RESAVE_HINT}"
            )
        return str(path)
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(cfg.hub_id, "config.json"), str):
        raise WeightsNotFound(
            f"model={cfg.name}: weights for {cfg.hub_id} are not available offline; download "
            f"them (hf download {cfg.hub_id} --local-dir DIR) and run with model.path=DIR"
        )
    if not any(isinstance(try_to_load_from_cache(cfg.hub_id, f), str) for f in SAFETENSORS_FILES):
        raise WeightsNotFound(
            f"model={cfg.name}: the cached weights of {cfg.hub_id} are not safetensors, and "
            f"weights load only from safetensors: {RESAVE_HINT}"
        )
    return cfg.hub_id


def check_json(path: Path, key: str) -> None:
    """A config file that is not a JSON object: one line now, not a library traceback later."""
    import json

    try:
        ok = isinstance(json.loads(path.read_text(encoding="utf-8")), dict)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise WeightsNotFound(
            f"{key}: {path} is unreadable ({str(exc).splitlines()[0]}): restore it from the model's original files"
        ) from None
    if not ok:
        raise WeightsNotFound(f"{key}: {path} is not a JSON object: restore it from the model's original files")


def _quantization_config(cfg: ModelConfig):
    return None if cfg.quantization == "none" else bitsandbytes_config(cfg.quantization, "model.quantization")


def bitsandbytes_config(bits: str, key: str):
    """bitsandbytes settings for loading: "8bit" (LLM.int8) or "4bit" (QLoRA's NF4, double
    quantization, bf16 compute). `key` names the setting that asked, for the error line."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"{key} needs bitsandbytes: pip install bitsandbytes, or set {key}=none") from None
    from transformers import BitsAndBytesConfig

    if bits == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer with the competition's masked tokens as special tokens. A tiny model
    given a model.path (a saved tiny run) reads it from there, like any model."""
    if cfg.tiny and not cfg.path:
        tok = tiny_tokenizer()
    else:
        from transformers import AutoTokenizer

        source = weights_source(cfg)
        try:
            tok = AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise WeightsNotFound(
                f"model={cfg.name}: no loadable tokenizer in {source} "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): the folder "
                f"needs the tokenizer files beside config.json"
            ) from None
        tok.add_special_tokens({"additional_special_tokens": MASKED_TOKENS}, replace_extra_special_tokens=False)
        check_tokenizer(tok, f"model.path={cfg.path}" if cfg.path else f"model={cfg.name} ({source})")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def preimport(cfg: ModelConfig) -> None:
    """Import the modules a model load needs, so their memory is not counted as the job's
    (the first job of a sweep would otherwise read larger than the rest)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, get_scheduler  # noqa: F401

    if cfg.tiny and cfg.tiny.arch == "bart":
        from transformers import BartForConditionalGeneration  # noqa: F401
    elif cfg.tiny and cfg.tiny.arch == "llama":
        from transformers import LlamaForCausalLM  # noqa: F401
    if cfg.lora.enabled:
        import peft  # noqa: F401
    if cfg.quantization != "none":
        _quantization_config(cfg)


def load(cfg: ModelConfig, tok, seed: int, device: torch.device) -> LoadedModel:
    """The model for `tok`: LoRA/QLoRA and gradient checkpointing applied. A tiny architecture is
    built with random init unless model.path names weights to start from."""
    return with_adapters(cfg, load_base(cfg, tok, seed, device), tok, seed)


def load_base(cfg: ModelConfig, tok, seed: int, device: torch.device):
    """The weights, prepared for training (quantized, k-bit preparation, checkpointing) but without
    LoRA adapters: what a sweep's cells can share (summ/training/reuse.py)."""
    source = None if cfg.tiny and not cfg.path else weights_source(cfg)
    quant = _quantization_config(cfg)
    kwargs: dict[str, Any] = {}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = attention(cfg)
    if source is None and quant is None:
        model = tiny_model(cfg, tok, seed)
    else:
        if source is None:  # bitsandbytes quantizes while loading: go through safetensors on disk
            source = tiny_weights_dir(cfg, tok, seed)
        kwargs.update(
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code,
            dtype=torch_dtype(cfg.dtype),
        )
        if quant is not None:
            kwargs.update(quantization_config=quant, device_map={"": device})
        where = f"model.path={cfg.path}" if cfg.path else f"model={cfg.name} ({source})"
        try:
            model = from_pretrained_checked(auto_class(cfg.kind), source, where, **kwargs)
        except (OSError, ValueError, KeyError) as exc:  # weights or a config.json transformers cannot read
            raise WeightsNotFound(
                f"{where}: no loadable safetensors weights ({str(exc).splitlines()[0]}): {RESAVE_HINT}"
            ) from None
    fit_vocabulary(model, tok)
    model.config.use_cache = False  # no KV cache while training; generation turns it back on
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.gradient_checkpointing:  # transformers 5 renamed it; the old name warns on every run
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def with_adapters(cfg: ModelConfig, model, tok, seed: int) -> LoadedModel:
    """LoRA adapters on `model` (when configured), initialised from `seed`, and torch's RNG left
    seeded: a run starts from the same state whatever ran before it in the process."""
    if cfg.lora.enabled:
        from peft import LoraConfig, TaskType, get_peft_model

        task = TaskType.SEQ_2_SEQ_LM if cfg.kind == ModelKind.seq2seq else TaskType.CAUSAL_LM
        torch.manual_seed(seed)
        model = get_peft_model(
            model,
            LoraConfig(
                r=cfg.lora.r,
                lora_alpha=cfg.lora.alpha,
                lora_dropout=cfg.lora.dropout,
                target_modules=list(cfg.lora.target_modules) or None,
                task_type=task,
            ),
        )
    torch.manual_seed(seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    decoder_start = getattr(model.config, "decoder_start_token_id", None) if cfg.kind == ModelKind.seq2seq else None
    if cfg.kind == ModelKind.seq2seq and decoder_start is None:
        decoder_start = tok.eos_token_id
    return LoadedModel(
        model=model,
        tokenizer=tok,
        kind=cfg.kind,
        decoder_start_token_id=decoder_start,
        trainable_params=trainable,
        total_params=total,
    )


def fit_vocabulary(model, tok) -> None:
    """Rows for every id of `tok` (the masked tokens added), padded to VOCAB_MULTIPLE when they grow:
    the same size at training and at prediction, so a saved model or adapter fits it."""
    if model.get_input_embeddings().num_embeddings < len(tok):
        model.resize_token_embeddings(len(tok), pad_to_multiple_of=VOCAB_MULTIPLE)


def vocabulary_rows(model) -> int:
    """The rows of the model's output layer: the ids it can score (the tokenizer's, and padding)."""
    rows = getattr(model.get_output_embeddings(), "out_features", None)  # also quantized (int8, 4-bit) heads
    return rows if isinstance(rows, int) else int(model.config.get_text_config().vocab_size)


def rows_past_tokenizer(tok, rows: int) -> list[int]:
    """The output rows no id of `tok` names (padding to VOCAB_MULTIPLE, a model's own spare rows):
    generate() suppresses them, so no id the tokenizer lacks is ever emitted."""
    return list(range(len(tok), rows))


def resident_bytes(model) -> int:
    """Bytes the model's parameters and buffers hold (4-bit weights as packed)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
