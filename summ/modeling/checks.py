"""A model folder is what it claims, checked where it is first read, before any training.

- Its tokenizer encodes Korean to real tokens. A folder with weights and no tokenizer files still
  gives a tokenizer: transformers builds the config's class from nothing (a BART folder gave a
  5-id RobertaTokenizer that turned every dialogue into `<s></s>` and the speaker tags), and the
  run trained and predicted garbage with exit 0. The bundled sample's dialogues are encoded and
  decoded: the Hangul that comes back must be most of what went in.
- Its weights fit its config.json: every tensor the architecture has is loaded (none missing: a
  missing one is randomly initialised, and the model is partly random), none left over (weights of
  another architecture), none of another shape (another vocabulary or width). transformers prints
  a table of 60 lines and goes on, or raises after it; here it is one line naming the folder.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re

from summ.errors import WeightsNotFound

HANGUL = re.compile(r"[\uac00-\ud7a3]")
KEPT_AT_LEAST = 0.9  # of the sample's Hangul syllables, after encoding and decoding
# Buffers older checkpoints carry and transformers rebuilds (GPT-NeoX's causal mask, rotary tables):
# left over in the file, harmless.
HARMLESS_LEFTOVERS = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq", ".masked_bias")


@functools.lru_cache(maxsize=1)
def _korean_sample() -> tuple[str, ...]:
    from summ.data.samples import bundled_sample_dir, read_csv

    return tuple(s.dialogue for s in read_csv(bundled_sample_dir() / "train.csv", need_summary=True)[:8])


def check_tokenizer(tok, where: str) -> None:
    """Raise WeightsNotFound (one line) unless `tok` keeps the bundled Korean sample through encoding
    and decoding; `where` names the folder or setting it came from."""
    special = set(tok.all_special_ids)
    sent = kept = 0
    for text in _korean_sample():
        ids = [i for i in tok(text, add_special_tokens=False)["input_ids"] if i not in special]
        sent += len(HANGUL.findall(text))
        kept += len(HANGUL.findall(tok.decode(ids, skip_special_tokens=True))) if ids else 0
    if sent and kept < KEPT_AT_LEAST * sent:
        raise WeightsNotFound(
            f"{where}: its tokenizer ({type(tok).__name__}, {len(tok):,} ids) keeps {kept / sent:.0%} of the Korean "
            f"in the bundled sample: it is not this model's (no tokenizer files of its own?); put the model's "
            f"tokenizer files (tokenizer.json, or its vocabulary files) beside config.json"
        )


@contextlib.contextmanager
def _no_load_report():
    """transformers' own load table stays off the console: check_loaded says what matters in one line."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def from_pretrained_checked(auto, source: str, where: str, **kwargs):
    """`auto.from_pretrained(source, **kwargs)`, refused with one line where the weights do not fit
    the folder's config.json (check_loaded)."""
    try:
        with _no_load_report():
            model, info = auto.from_pretrained(source, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except Exception as exc:
        if not _unreadable_weights(exc):
            raise
        raise WeightsNotFound(
            f"{where}: its weights cannot be read ({type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:160]}): the file is truncated or damaged; copy "
            f"it again, or point at another folder"
        ) from None
    check_loaded(info, where, type(model).__name__)
    return model


def _unreadable_weights(exc: BaseException) -> bool:
    """A weights file that is not what its name says: safetensors' header or data, or torch's
    pickle (a truncated copy, an interrupted download, another file renamed)."""
    name = type(exc).__name__
    text = str(exc)
    return (
        name in ("SafetensorError", "HeaderTooLarge", "HeaderTooSmall", "UnpicklingError", "EOFError")
        or "deserializing header" in text
        or "invalid load key" in text
        or "PytorchStreamReader" in text
    )


def check_loaded(info: dict, where: str, architecture: str) -> None:
    missing = list(info.get("missing_keys") or ())
    leftover = [k for k in info.get("unexpected_keys") or () if not k.endswith(HARMLESS_LEFTOVERS)]
    mismatched = list(info.get("mismatched_keys") or ())
    if not (missing or leftover or mismatched):
        return
    parts = []
    if mismatched:  # the largest one names it best (the embedding, not a bias beside it); the same every time
        key, ckpt, model = max(
            ((tuple(m) + (None, None))[:3] for m in mismatched), key=lambda m: (math.prod(m[2] or ()), m[0])
        )
        parts.append(
            f"{len(mismatched)} of another shape ({key}: {_shape(ckpt)} in the file, {_shape(model)} in the config)"
        )
    if missing:
        parts.append(f"{len(missing)} missing, which would train from random values ({sorted(missing)[0]}, ...)")
    if leftover:
        parts.append(f"{len(leftover)} left over ({sorted(leftover)[0]}, ...)")
    raise WeightsNotFound(
        f"{where}: its weights do not fit its config.json ({architecture}): "
        f"{'; '.join(parts)}; the weights belong to another model: use the folder they were saved "
        f"with, config.json included"
    )


def _shape(shape) -> str:
    return "x".join(str(n) for n in shape) if shape is not None else "?"


def check_packed_rows_isolated(model, config, device, attention: str | None) -> None:
    """data.packing: raise ConfigError (one line) unless samples packed in one row stay apart on this
    model and attention: a sample's logits after another one in the row equal its logits alone, and
    do not move when the other one's tokens change. Three forwards of a few tokens, in eval mode,
    through `model` as prepared (a DDP, FSDP or DeepSpeed wrapper runs them as it runs training's;
    every process takes part); `config`: the unwrapped model's."""
    import torch

    from summ.errors import ConfigError

    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    g = torch.Generator().manual_seed(0)
    first, other, second = (torch.randint(3, config.vocab_size, (n,), generator=g) for n in (7, 7, 5))

    def logits_of_second(*parts):
        ids = torch.cat(parts)[None].to(device)
        positions = torch.cat([torch.arange(len(p)) for p in parts])[None].to(device)
        return model(input_ids=ids, position_ids=positions).logits[0, -len(parts[-1]) :].float()

    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone, packed, moved = (
                logits_of_second(second),
                logits_of_second(first, second),
                logits_of_second(other, second),
            )
    finally:
        model.train(training)
    exact = all(p.dtype == torch.float32 for p in model.parameters())  # 4-bit weights are stored as uint8
    tolerance = (1e-3 if exact else 5e-2) * float(alone.abs().max())  # low precision: its rounding, not a leak
    leak = max(float((packed - alone).abs().max()), float((moved - packed).abs().max()))
    if leak > tolerance:
        raise ConfigError(
            f"data.packing=true: {config.model_type} with attn_implementation={attention or 'default'} lets samples "
            f"packed in one row attend to each other (a sample's logits moved by {leak:.3g} with its neighbour): "
            "use model.attn_implementation=sdpa, sdpa_varlen or eager (flash_attention_2 on a GPU), "
            "or data.packing=false"
        )
