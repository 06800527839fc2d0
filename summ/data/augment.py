"""Training-data augmentation (augmentation=turn_shuffle|synonym|back_translation|paraphrase|all).

New training samples only: dev and test are never augmented. Seeded. Speaker tags and masked
tokens are preserved by construction (text is edited only between `#...#` tokens), and the
summary stays consistent with its dialogue:
- turn_shuffle: turns shuffled inside windows of `augmentation.shuffle_window`, first and last
  turns kept; who says what is unchanged, so the summary is too.
- synonym: general nouns replaced from the bundled lexicon (summ/resources/synonyms_ko.tsv,
  written for this project), particles after them fixed; the summary is kept.
- back_translation: each utterance ko -> en -> ko through the generation backend.
- paraphrase: each utterance through the backend's Korean paraphraser.
Backend outputs are cached on disk (generation.cache_dir), so a sweep does not regenerate them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import replace

from summ.data.samples import Sample
from summ.data.textops import map_text, replace_synonyms, shuffle_turns
from summ.errors import ConfigError

log = logging.getLogger(__name__)

NEEDS_BACKEND = {"back_translation": ("ko_en", "en_ko"), "paraphrase": ("paraphrase",)}


def _segments(text: str) -> list[str]:
    found: list[str] = []
    map_text(text, lambda seg: found.append(seg) or seg)
    return found


def rewrite_with_backend(dialogues: Sequence[str], backend, tasks: Sequence[str]) -> list[str]:
    """Run every text stretch between `#...#` tokens through the backend's tasks in order (one
    batched call per task). Tags and masked tokens never pass through the model, so they stay."""
    segs = [s for d in dialogues for s in _segments(d)]
    outs = list(segs)
    for task in tasks:
        outs = backend.generate([o.strip() for o in outs], task) if outs else []
    # an empty output, or one that invents tags, masked tokens or line breaks, keeps the original
    mapping = {s: (o if o.strip() and "#" not in o and "\n" not in o else s) for s, o in zip(segs, outs)}

    def keep_spacing(seg: str) -> str:
        new = mapping.get(seg, seg)
        lead = seg[: len(seg) - len(seg.lstrip())]
        trail = seg[len(seg.rstrip()) :]
        return lead + new.strip() + trail

    return [map_text(d, keep_spacing) for d in dialogues]


def augment(train: Sequence[Sample], cfg, backend=None) -> tuple[list[Sample], dict]:
    """New samples for each configured method; returns them and a report for the run's metrics."""
    report: dict = {"methods": [str(m) for m in cfg.methods], "ratio": cfg.ratio, "added": {}, "skipped": {}}
    new: list[Sample] = []
    for k, method in enumerate(cfg.methods):
        if method in NEEDS_BACKEND and (
            backend is None or not all(backend.backend.supports(t) for t in NEEDS_BACKEND[method])
        ):
            reason = (
                f"no generation backend for {'/'.join(NEEDS_BACKEND[method])}: set generation.kind=local (or solar) "
                f"and generation.{NEEDS_BACKEND[method][0]}_path"
            )
            if len(cfg.methods) == 1:
                raise ConfigError(f"augmentation={method} needs a model: {reason}")
            log.warning("augmentation %s skipped: %s", method, reason)
            report["skipped"][method] = reason
            continue
        rng = random.Random(cfg.seed * 1000 + k)
        n = min(len(train), round(cfg.ratio * len(train)))
        chosen = sorted(rng.sample(range(len(train)), n))
        originals = [train[i] for i in chosen]
        if method == "turn_shuffle":
            dialogues = [shuffle_turns(s.dialogue, rng, cfg.shuffle_window) for s in originals]
        elif method == "synonym":
            dialogues = [replace_synonyms(s.dialogue, rng, cfg.synonym_rate) for s in originals]
        else:
            dialogues = rewrite_with_backend([s.dialogue for s in originals], backend, NEEDS_BACKEND[method])
        made = [
            replace(s, fname=f"{s.fname}_{method}", dialogue=d) for s, d in zip(originals, dialogues) if d != s.dialogue
        ]
        report["added"][method] = len(made)
        new += made
    report["total_added"] = len(new)
    return new, report
