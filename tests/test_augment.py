"""Augmentation and TTA methods: tags and masked tokens preserved, deterministic under a seed,
dev and test never augmented; the generation backend's cache; MBR."""

from __future__ import annotations

import random
import re
from types import SimpleNamespace

import pytest

from summ.data.augment import augment, rewrite_with_backend
from summ.data.samples import bundled_sample_dir, read_csv
from summ.data.textops import mask_words, replace_synonyms, shuffle_turns
from summ.inference.ensemble import mbr_select
from summ.inference.tta import perturb

TOKENS = re.compile(r"#[A-Za-z]+\d*#")
TRAIN = read_csv(bundled_sample_dir() / "train.csv", need_summary=True)
WITH_MASKS = [s for s in TRAIN if re.search(r"#(Phone|Address|Email|Card|Car|SSN|Passport|DateOf)", s.dialogue)]


def tokens(text: str) -> list[str]:
    return TOKENS.findall(text)


def aug_cfg(methods, ratio=0.5, seed=0):
    return SimpleNamespace(name="x", methods=methods, ratio=ratio, seed=seed, shuffle_window=3, synonym_rate=0.5)


def test_turn_shuffle_keeps_every_turn_and_the_ends():
    for s in TRAIN[:30]:
        out = shuffle_turns(s.dialogue, random.Random(1))
        a, b = s.dialogue.split("\n"), out.split("\n")
        assert sorted(a) == sorted(b) and a[0] == b[0] and a[-1] == b[-1]
    assert shuffle_turns(TRAIN[0].dialogue, random.Random(5)) == shuffle_turns(TRAIN[0].dialogue, random.Random(5))


def test_synonym_fixes_particles_and_never_touches_tokens():
    lex = {"예약": ("예매",), "가격": ("값",), "회의": ("미팅",)}
    text = "#Person1#: 예약을 바꾸고 가격이 궁금해요. 회의는 #Address#에서 해요."
    out = replace_synonyms(text, random.Random(0), rate=1.0, lex=lex)
    assert out == "#Person1#: 예매를 바꾸고 값이 궁금해요. 미팅은 #Address#에서 해요."


def test_bundled_lexicon_changes_real_dialogues_and_keeps_tokens():
    changed = 0
    for s in TRAIN[:40]:
        out = replace_synonyms(s.dialogue, random.Random(3), rate=0.5)
        assert tokens(out) == tokens(s.dialogue)
        changed += out != s.dialogue
    assert changed >= 20


def test_mask_words_keeps_tokens():
    for s in WITH_MASKS[:10]:
        out = mask_words(s.dialogue, random.Random(0), 0.5, "<mask>")
        assert tokens(out) == tokens(s.dialogue) and "<mask>" in out


def test_augment_is_seeded_new_samples_only_tokens_preserved():
    new, report = augment(TRAIN, aug_cfg(["turn_shuffle", "synonym"]))
    again, _ = augment(TRAIN, aug_cfg(["turn_shuffle", "synonym"]))
    other, _ = augment(TRAIN, aug_cfg(["turn_shuffle", "synonym"], seed=1))
    assert new == again and new != other
    assert 0 < report["added"]["turn_shuffle"] <= 60 and 0 < report["added"]["synonym"] <= 60
    originals = {s.fname: s for s in TRAIN}
    for s in new:
        assert s.fname not in originals
        src = next(o for o in TRAIN if s.fname.startswith(o.fname + "_"))
        assert sorted(tokens(s.dialogue)) == sorted(tokens(src.dialogue))
        assert s.summaries == src.summaries


def test_methods_that_need_a_model_say_so():
    from summ.errors import ConfigError

    with pytest.raises(ConfigError, match="generation.kind=local"):
        augment(TRAIN, aug_cfg(["back_translation"]))
    new, report = augment(TRAIN, aug_cfg(["turn_shuffle", "paraphrase"]))
    assert "paraphrase" in report["skipped"] and report["added"]["turn_shuffle"] > 0


@pytest.fixture(scope="module")
def tiny_translators(tmp_path_factory):
    """Two tiny local seq2seq models standing in for a MarianMT ko-en / en-ko pair."""
    import torch
    from omegaconf import OmegaConf

    from summ.modeling import models
    from tests.conftest import compose_cfg

    cfg = OmegaConf.to_object(compose_cfg([]))
    paths = {}
    for name, seed in (("ko_en", 1), ("en_ko", 2)):
        tok = models.load_tokenizer(cfg.model)
        lm = models.load(cfg.model, tok, seed, torch.device("cpu"))
        with torch.no_grad():  # a random BART often ends at once (its decoder starts from </s>): never here
            lm.model.final_logits_bias[:, tok.eos_token_id] = -100.0
        path = tmp_path_factory.mktemp(name)
        lm.model.save_pretrained(path)
        tok.save_pretrained(path)
        paths[name] = str(path)
    return paths


def test_back_translation_through_local_models_is_cached_and_keeps_tokens(tiny_translators, tmp_path):
    from summ.inference.backends import build

    gen = SimpleNamespace(
        kind="local",
        ko_en_path=tiny_translators["ko_en"],
        en_ko_path=tiny_translators["en_ko"],
        paraphrase_path=None,
        batch_size=8,
        max_new_tokens=12,
        num_beams=1,
    )
    backend = build(gen, tmp_path)
    samples = WITH_MASKS[:4]
    out = rewrite_with_backend([s.dialogue for s in samples], backend, ("ko_en", "en_ko"))
    assert backend.misses > 0
    for s, d in zip(samples, out):
        assert tokens(d) == tokens(s.dialogue) and d != s.dialogue
    fresh = build(gen, tmp_path)  # a new process would see the same cache file
    assert rewrite_with_backend([s.dialogue for s in samples], fresh, ("ko_en", "en_ko")) == out
    assert fresh.misses == 0
    new, report = augment(samples, aug_cfg(["back_translation"], ratio=1.0), backend)
    assert report["added"]["back_translation"] == 4


def test_tta_copies_keep_tokens_and_are_seeded():
    cfg = SimpleNamespace(num_aug=3, seed=0, shuffle_window=3, synonym_rate=0.5, mask_rate=0.3)
    copies = perturb(WITH_MASKS[:5], cfg, ["reorder", "mask", "synonym"], "<mask>")
    assert len(copies) == 3 and all(len(c) == 5 for c in copies)
    for copy in copies:
        for orig, pert in zip(WITH_MASKS[:5], copy):
            assert sorted(tokens(pert.dialogue)) == sorted(tokens(orig.dialogue))
            assert pert.fname == orig.fname and pert.summaries == orig.summaries
    assert perturb(WITH_MASKS[:5], cfg, ["reorder", "mask", "synonym"], "<mask>") == copies


def test_mbr_picks_the_consensus():
    cands = [
        "#Person1#은 내일 병원에 갑니다.",
        "#Person1#은 내일 병원에 가기로 합니다.",
        "두 사람은 점심을 먹습니다.",
        "#Person1#은 내일 병원에 갑니다.",
    ]
    assert mbr_select(cands) in (0, 3)
    assert mbr_select(["a b c", "x y z", "a b d"], weights=[1.0, 100.0, 1.0]) in (0, 2)


def test_dev_and_test_are_never_augmented(run_job):
    m, _ = run_job("augmentation=turn_shuffle", "measure.steps=1", "eval.generate=false")
    assert m["status"] == "ok"
    assert m["train_set_size"] == 120 + m["augmentation"]["added"]["turn_shuffle"]
    assert m["eval_set_size"] == 30 and m["eval"]["n"] == 30


def test_tta_paraphrase_goes_through_the_backend_and_keeps_tokens(tiny_translators, tmp_path):
    from summ.inference.backends import build
    from summ.inference.tta import usable_methods

    gen = SimpleNamespace(
        kind="local",
        ko_en_path=None,
        en_ko_path=None,
        paraphrase_path=tiny_translators["ko_en"],
        batch_size=8,
        max_new_tokens=12,
        num_beams=1,
    )
    backend = build(gen, tmp_path)
    cfg = SimpleNamespace(
        name="paraphrase", methods=["paraphrase"], num_aug=1, seed=0, shuffle_window=3, synonym_rate=0.5, mask_rate=0.1
    )
    assert usable_methods(cfg, backend) == (["paraphrase"], {})
    copies = perturb(WITH_MASKS[:3], cfg, ["paraphrase"], None, backend)
    for orig, pert in zip(WITH_MASKS[:3], copies[0]):
        assert tokens(pert.dialogue) == tokens(orig.dialogue) and pert.dialogue != orig.dialogue
    from summ.errors import ConfigError

    with pytest.raises(ConfigError, match="generation.paraphrase_path"):
        usable_methods(cfg, None)  # paraphrase alone, without a backend: one clear line
