"""Evaluation: eval loss over the dev set, summaries generated with the `inference` settings,
ROUGE against the references, dev predictions saved as CSV."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence

import torch
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from summ.config import InferenceConfig, ModelKind, RougeTokenizer
from summ.data.samples import MASKED_TOKENS, Sample
from summ.data.tokenize import IGNORE_INDEX, Encoder, left_pad
from summ.distributed import sharded_by
from summ.files import atomic_write_text
from summ.inference.ensemble import LogitAverage
from summ.inference.scoring import clean_prediction, rouge_scores
from summ.measure.timing import now, synchronize
from summ.modeling.loss import model_inputs, token_losses
from summ.modeling.models import rows_past_tokenizer, vocabulary_rows


def eval_loss(accelerator, model, loader: DataLoader, kind: ModelKind) -> float | None:
    """Mean token cross-entropy over the dev set (no label smoothing), gathered over processes."""
    model.eval()
    sums, counts = [], []
    with torch.no_grad():
        for batch in loader:
            with accelerator.autocast():
                logits = model(**model_inputs(batch)).logits
            losses, labels = token_losses(logits, batch["labels"], kind)
            per_sample, n_labels = losses.sum(dim=1), (labels != IGNORE_INDEX).sum(dim=1)
            s, c = accelerator.gather_for_metrics((per_sample.detach(), n_labels))
            sums.append(s.float().cpu())
            counts.append(c.cpu())
    total = float(torch.cat(counts).sum()) if counts else 0.0
    return float(torch.cat(sums).sum()) / total if total else None


def generation_config(cfg: InferenceConfig, tokenizer, kind: ModelKind, vocabulary: int | None = None):
    """`vocabulary`: the model's output rows; those past the tokenizer's (padding to a multiple of
    64, or a model's own spare rows) are suppressed, so no id the tokenizer lacks is ever emitted."""
    from transformers import GenerationConfig

    kwargs = dict(
        num_beams=cfg.num_beams,
        max_new_tokens=cfg.max_new_tokens,
        do_sample=cfg.do_sample,
        repetition_penalty=cfg.repetition_penalty,
        length_penalty=cfg.length_penalty,
        no_repeat_ngram_size=cfg.no_repeat_ngram_size,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=True,
    )
    if kind == ModelKind.seq2seq:
        kwargs["forced_eos_token_id"] = tokenizer.eos_token_id
    if cfg.do_sample:
        kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    if vocabulary is not None and vocabulary > len(tokenizer):
        kwargs["suppress_tokens"] = rows_past_tokenizer(tokenizer, vocabulary)
    return GenerationConfig(**kwargs)


def housekeeping_tokens(tokenizer) -> list[str]:
    """Special tokens to strip from generated text: all of the tokenizer's but the masked tokens."""
    keep = set(MASKED_TOKENS)
    return sorted((t for t in tokenizer.all_special_tokens if t not in keep), key=len, reverse=True)


def generate(
    accelerator,
    model,
    samples: Sequence[Sample],
    encoder: Encoder,
    tokenizer,
    cfg: InferenceConfig,
    kind: ModelKind,
    batch_size: int,
    num_candidates: int = 1,
    co_members: Sequence = (),
    sort_by_length: bool = True,
) -> tuple[list, float]:
    """Summaries for `samples` in their order, and the generation wall seconds. With
    num_candidates > 1 each item is the list of the top beams (at most num_beams). With
    co_members, decoding averages their next-token log-probabilities with the model's (logit_avg).

    Batches are formed from length-sorted prompts (less padding; sort_by_length=false keeps the
    samples' order), split over processes, and the original order is restored at the end.
    """
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    gen_cfg = generation_config(cfg, tokenizer, kind, vocabulary_rows(unwrapped))
    n_ret = max(1, min(num_candidates, cfg.num_beams if not cfg.do_sample else num_candidates))
    gen_cfg.num_return_sequences = n_ret
    prompts = [encoder.prompt_ids(s.dialogue) for s in samples]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i])) if sort_by_length else list(range(len(prompts)))
    strip = housekeeping_tokens(tokenizer)
    outputs: dict[int, object] = {}
    synchronize(accelerator.device)
    start = now()
    # Sharded weights (FSDP): every forward is a collective, so every process makes as many generate()
    # calls as the others (the last sample repeated, its duplicate result dropped by index), and
    # keeps stepping until the longest sequence of all is done (synced_gpus).
    sharded = sharded_by(accelerator) == "fsdp" and accelerator.num_processes > 1
    with accelerator.split_between_processes(order, apply_padding=sharded) as mine:
        for b in range(0, len(mine), batch_size):
            idx = mine[b : b + batch_size]
            if kind == ModelKind.causal:
                inputs = left_pad([prompts[i] for i in idx], tokenizer.pad_token_id)
            else:
                width = max(len(prompts[i]) for i in idx)
                inputs = {
                    "input_ids": torch.tensor(
                        [prompts[i] + [tokenizer.pad_token_id] * (width - len(prompts[i])) for i in idx]
                    ),
                    "attention_mask": torch.tensor(
                        [[1] * len(prompts[i]) + [0] * (width - len(prompts[i])) for i in idx]
                    ),
                }
            inputs = {k: v.to(accelerator.device) for k, v in inputs.items()}
            extra = {"synced_gpus": True} if sharded else {}
            if co_members:
                from transformers import LogitsProcessorList

                extra["logits_processor"] = LogitsProcessorList(
                    [LogitAverage(co_members, inputs, kind.value, 1 if gen_cfg.do_sample else gen_cfg.num_beams)]
                )
            with torch.no_grad(), accelerator.autocast():
                out = unwrapped.generate(**inputs, generation_config=gen_cfg, **extra)
            if kind == ModelKind.causal:
                out = out[:, inputs["input_ids"].size(1) :]
            texts = tokenizer.batch_decode(out, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            cleaned = [clean_prediction(t, strip) for t in texts]
            for j, i in enumerate(idx):
                group = cleaned[j * n_ret : (j + 1) * n_ret]
                outputs[i] = group if num_candidates > 1 else group[0]
    gathered = gather_object([outputs])
    synchronize(accelerator.device)
    seconds = now() - start
    merged = {k: v for part in gathered for k, v in part.items()}
    return [merged[i] for i in range(len(samples))], seconds


def score(samples: Sequence[Sample], predictions: Sequence[str], tokenizer: RougeTokenizer) -> dict:
    return rouge_scores(predictions, [s.summaries for s in samples], tokenizer)


def predictions_csv(samples: Sequence[Sample], predictions: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["fname", "prediction", "reference", "all_references"])
    for s, p in zip(samples, predictions):  # all_references: every reference, as a JSON list
        writer.writerow([s.fname, p, s.summary, json.dumps(s.summaries, ensure_ascii=False)])
    return buf.getvalue()


def save_predictions(path, samples: Sequence[Sample], predictions: Sequence[str]) -> None:
    atomic_write_text(path, predictions_csv(samples, predictions))
