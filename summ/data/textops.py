"""Meaning-preserving edits of Korean dialogues, shared by training augmentation (augment.py)
and test-time augmentation (tta.py). Speaker tags and masked tokens (`#...#`) are never touched:
text is edited only between them.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

from summ.data.samples import TURN


@functools.lru_cache(maxsize=1)
def kiwi():
    """The Korean morpheme analyser (kiwipiepy), loaded once per process: particle fixes here,
    morpheme ROUGE in summ/inference/scoring.py."""
    from kiwipiepy import Kiwi

    return Kiwi()


_TOKEN = re.compile(r"(#[A-Za-z]+\d*#)")  # speaker tags and masked tokens

# Particles whose form follows the final consonant (batchim) of the noun before them.
_PAIRS = {
    "을": "를",
    "를": "을",
    "이": "가",
    "가": "이",
    "은": "는",
    "는": "은",
    "과": "와",
    "와": "과",
    "이나": "나",
    "나": "이나",
    "이랑": "랑",
    "랑": "이랑",
}
_AFTER_BATCHIM = {"을", "이", "은", "과", "이나", "이랑"}


def split_turns(dialogue: str) -> list[tuple[str, str]]:
    """[(tag prefix, utterance)], e.g. ('#Person1#: ', '안녕하세요.'); untagged lines keep an empty prefix."""
    out = []
    for line in dialogue.split("\n"):
        m = TURN.match(line)
        out.append((m.group(1), m.group(2)) if m else ("", line))
    return out


def join_turns(turns: Sequence[tuple[str, str]]) -> str:
    return "\n".join(p + u for p, u in turns)


def map_text(text: str, fn: Callable[[str], str]) -> str:
    """Apply fn to the stretches of text between `#...#` tokens; the tokens stay as they are."""
    parts = _TOKEN.split(text)
    return "".join(p if _TOKEN.fullmatch(p) else (fn(p) if p.strip() else p) for p in parts)


def shuffle_turns(dialogue: str, rng: random.Random, window: int = 3) -> str:
    """Shuffle turns inside consecutive windows of `window` turns; the first and last turns stay."""
    turns = split_turns(dialogue)
    if len(turns) < 4:
        return dialogue
    middle = turns[1:-1]
    for i in range(0, len(middle), window):
        chunk = middle[i : i + window]
        rng.shuffle(chunk)
        middle[i : i + window] = chunk
    return join_turns([turns[0], *middle, turns[-1]])


@functools.lru_cache(maxsize=1)
def lexicon() -> dict[str, tuple[str, ...]]:
    """The bundled Korean noun synonym lexicon (summ/resources/synonyms_ko.tsv)."""
    path = Path(str(resources.files("summ") / "resources" / "synonyms_ko.tsv"))
    out: dict[str, tuple[str, ...]] = {}
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        word, _, syns = line.partition("\t")
        if word and syns:
            out[word] = tuple(s for s in syns.split("|") if s)
    return out


def _has_batchim(word: str) -> bool:
    last = word[-1]
    return "가" <= last <= "힣" and (ord(last) - 0xAC00) % 28 != 0


def _fix_particle(noun: str, particle: str) -> str:
    if particle in ("으로", "로"):
        final = (ord(noun[-1]) - 0xAC00) % 28 if "가" <= noun[-1] <= "힣" else 0
        return "으로" if final not in (0, 8) else "로"  # 8 = ㄹ takes 로
    if particle in _PAIRS:
        wants_batchim_form = _has_batchim(noun)
        is_batchim_form = particle in _AFTER_BATCHIM
        return particle if wants_batchim_form == is_batchim_form else _PAIRS[particle]
    return particle


def replace_synonyms(
    text: str, rng: random.Random, rate: float = 0.3, lex: dict[str, tuple[str, ...]] | None = None
) -> str:
    """Replace general nouns found in the lexicon with a synonym (each with probability `rate`),
    fixing the particle right after a replaced noun (을/를, 이/가, 은/는, 과/와, 으로/로, ...)."""
    lex = lexicon() if lex is None else lex

    def edit(segment: str) -> str:
        tokens = kiwi().tokenize(segment)
        pieces, pos, i = [], 0, 0
        while i < len(tokens):
            t = tokens[i]
            if (
                t.tag == "NNG"
                and t.form in lex
                and segment[t.start : t.start + t.len] == t.form
                and rng.random() < rate
            ):
                new = rng.choice(lex[t.form])
                pieces.append(segment[pos : t.start] + new)
                pos = t.start + t.len
                nxt = tokens[i + 1] if i + 1 < len(tokens) else None
                if (
                    nxt is not None
                    and nxt.tag.startswith("J")
                    and nxt.start == pos
                    and segment[nxt.start : nxt.start + nxt.len] == nxt.form
                ):
                    pieces.append(_fix_particle(new, nxt.form))
                    pos = nxt.start + nxt.len
                    i += 1
            i += 1
        pieces.append(segment[pos:])
        return "".join(pieces)

    return map_text(text, edit)


def mask_words(text: str, rng: random.Random, rate: float, mask: str) -> str:
    """Replace a share of the words (outside `#...#` tokens) with `mask` ('' drops them)."""

    def edit(segment: str) -> str:
        words = segment.split(" ")
        out = [w if not w or rng.random() >= rate else mask for w in words]
        return " ".join(w for w in out if w != "" or mask != "")

    return map_text(text, edit)
