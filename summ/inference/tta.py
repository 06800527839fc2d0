"""Test-time augmentation (tta=reorder|mask|synonym|paraphrase|all, tta.num_aug).

Each evaluation dialogue gets `num_aug` perturbed copies (methods taken in turn), a summary is
generated for the original and every copy, and MBR picks one. Speaker tags and masked tokens
are never altered, so every copy still names the same people.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import replace

from summ.data.augment import rewrite_with_backend
from summ.data.samples import Sample
from summ.data.textops import mask_words, replace_synonyms, shuffle_turns
from summ.errors import ConfigError

log = logging.getLogger(__name__)


def usable_methods(cfg, backend, say: bool = True) -> tuple[list[str], dict]:
    """The configured methods that can run, and why the others cannot (said in the log unless
    `say` is false: a check before training, repeated at evaluation)."""
    skipped = {}
    methods = []
    for m in cfg.methods:
        if m == "paraphrase" and (backend is None or not backend.backend.supports("paraphrase")):
            skipped[m] = (
                "no generation backend for paraphrase: set generation.kind=solar, "
                "or local and generation.paraphrase_path"
            )
            continue
        methods.append(m)
    if not methods and cfg.methods:
        raise ConfigError(f"tta={cfg.name}: {skipped.get('paraphrase')}")
    for m, why in skipped.items() if say else ():
        log.warning("tta %s skipped: %s", m, why)
    return methods, skipped


def perturb(
    samples: Sequence[Sample], cfg, methods: Sequence[str], mask_token: str | None, backend=None
) -> list[list[Sample]]:
    """copies[k][i]: the k-th perturbed copy of samples[i] (seeded)."""
    copies = []
    for k in range(cfg.num_aug):
        method = methods[k % len(methods)]
        if method == "paraphrase" and k >= len(methods):
            continue  # the backend is deterministic: a second paraphrase copy would repeat the first
        rng = random.Random(cfg.seed * 1000 + k)
        if method == "reorder":
            dialogues = [shuffle_turns(s.dialogue, rng, cfg.shuffle_window) for s in samples]
        elif method == "mask":
            dialogues = [mask_words(s.dialogue, rng, cfg.mask_rate, mask_token or "") for s in samples]
        elif method == "synonym":
            dialogues = [replace_synonyms(s.dialogue, rng, cfg.synonym_rate) for s in samples]
        else:
            dialogues = rewrite_with_backend([s.dialogue for s in samples], backend, ("paraphrase",))
        copies.append([replace(s, dialogue=d) for s, d in zip(samples, dialogues)])
    return copies
