"""Text-generation backends for back-translation and paraphrase (augmentation and TTA), with
an on-disk cache so that a sweep never generates the same text twice.

`local`: seq2seq models from local folders (for example a MarianMT ko-en / en-ko pair and a
Korean paraphraser), loaded with from_pretrained(local_files_only=True). Any backend object with
`generate(texts, task) -> list[str]` (task: ko_en, en_ko or paraphrase) plugs in.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from summ.errors import ConfigError, WeightsNotFound
from summ.inference.cache import Cached, DiskCache


class LocalSeq2Seq:
    """Seq2seq models from local folders, one per task."""

    def __init__(
        self, paths: dict[str, str | None], batch_size: int = 16, max_new_tokens: int = 128, num_beams: int = 4
    ):
        self.paths = {t: p for t, p in paths.items() if p}
        self.batch_size, self.max_new_tokens, self.num_beams = batch_size, max_new_tokens, num_beams
        self.name = "local:" + ",".join(f"{t}={Path(p).name}" for t, p in sorted(self.paths.items()))
        self._loaded: dict[str, tuple] = {}
        for task, p in self.paths.items():
            if not (Path(p).expanduser() / "config.json").is_file():
                raise WeightsNotFound(
                    f"generation.{task}_path={p} has no config.json: point it at a "
                    f"folder with a local seq2seq model (e.g. a MarianMT checkpoint)"
                )

    def supports(self, task: str) -> bool:
        return task in self.paths

    def _model(self, task: str):
        if task not in self._loaded:
            from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

            path = str(Path(self.paths[task]).expanduser())
            self._loaded[task] = (
                AutoTokenizer.from_pretrained(path, local_files_only=True),
                AutoModelForSeq2SeqLM.from_pretrained(path, local_files_only=True, use_safetensors=True).eval(),
            )
        return self._loaded[task]

    def generate(self, texts: Sequence[str], task: str) -> list[str]:
        import torch

        if task not in self.paths:
            raise ConfigError(f"the local generation backend has no model for {task}: set generation.{task}_path")
        tok, model = self._model(task)
        out: list[str] = []
        for i in range(0, len(texts), self.batch_size):
            enc = tok(
                list(texts[i : i + self.batch_size]), return_tensors="pt", padding=True, truncation=True, max_length=512
            )
            enc.pop("token_type_ids", None)
            with torch.no_grad():  # never an id the tokenizer lacks (output rows padded past it)
                ids = model.generate(
                    **enc, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, **beyond_tokenizer(tok, model)
                )
            out += [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
        return out


def beyond_tokenizer(tok, model) -> dict:
    """generate()'s suppress_tokens for the model's output rows past the tokenizer's, if any."""
    from summ.modeling.models import rows_past_tokenizer, vocabulary_rows

    rows = rows_past_tokenizer(tok, vocabulary_rows(model))
    return {"suppress_tokens": rows} if rows else {}


def build(cfg, cache_dir: Path, solar_cfg=None) -> Cached | None:
    """The configured backend wrapped in the disk cache, or None when none is configured.
    generation.kind=solar prompts the Solar API (the `solar` section) for translation and paraphrase."""
    if cfg.kind == "none":
        return None
    if cfg.kind == "solar":
        from summ.inference.solar import SolarBackend  # on use: the openai SDK takes a moment to import

        return Cached(SolarBackend(solar_cfg), DiskCache(cache_dir / "generation.sqlite", "generation.cache_dir"))
    if cfg.kind == "local":
        backend = LocalSeq2Seq(
            {"ko_en": cfg.ko_en_path, "en_ko": cfg.en_ko_path, "paraphrase": cfg.paraphrase_path},
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens,
            num_beams=cfg.num_beams,
        )
        return Cached(backend, DiskCache(cache_dir / "generation.sqlite", "generation.cache_dir"))
    raise ConfigError(f"generation.kind={cfg.kind} is unknown: choose none, local or solar")
