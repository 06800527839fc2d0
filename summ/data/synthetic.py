"""Competition-shaped synthetic data for throughput work at the real scale (12,457 dialogues).

Lengths follow the competition's distribution (dialogue mean about 406 characters, mostly
200-600, a long tail past 2,000; summary about 0.14 of the dialogue): dialogue length is drawn
from a log-normal with median 360 and sigma 0.5. Text is assembled from the bundled sample's
utterances and summary sentences, so the tiny models' tokenizer sees realistic Korean and
token counts per character match the sample's. The content is not meaningful: use it to
measure speed and memory, never quality.
"""

from __future__ import annotations

import functools
import math
import random
import re

from summ.data.samples import SPEAKER_TAGS, TURN, Sample, bundled_sample_dir, read_csv

# Log-normal target length; turns are whole utterances, so a dialogue overshoots its target by
# about half a turn: median 340 gives a mean of about 406 characters.
DIALOGUE_MEDIAN_CHARS = 340.0
DIALOGUE_SIGMA = 0.5
SUMMARY_RATIO = 0.14
MIN_DIALOGUE_CHARS, MAX_DIALOGUE_CHARS = 80, 4000
SPEAKER_COUNTS = (2, 3, 4, 5, 6, 7)
SPEAKER_WEIGHTS = (0.76, 0.14, 0.06, 0.02, 0.01, 0.01)
_TAG = re.compile(r"#Person(\d)#")


@functools.lru_cache(maxsize=1)
def _pools() -> tuple[tuple[str, ...], tuple[str, ...]]:
    train = read_csv(bundled_sample_dir() / "train.csv", need_summary=True)
    utterances = tuple(m.group(2) for s in train for line in s.dialogue.split("\n") if (m := TURN.match(line)))
    sentences = tuple(p.strip() + "." for s in train for p in s.summary.split(".") if len(p.strip()) > 5)
    return utterances, sentences


def generate(n: int, seed: int = 0, prefix: str = "train") -> list[Sample]:
    """n dialogues with their summaries, the same for the same (n, seed)."""
    utterances, sentences = _pools()
    rng = random.Random(seed)
    mu = math.log(DIALOGUE_MEDIAN_CHARS)
    samples = []
    for i in range(n):
        target = min(max(int(rng.lognormvariate(mu, DIALOGUE_SIGMA)), MIN_DIALOGUE_CHARS), MAX_DIALOGUE_CHARS)
        speakers = rng.choices(SPEAKER_COUNTS, SPEAKER_WEIGHTS)[0]
        turns, length, speaker = [], 0, 1
        while length < target or len(turns) < 2:
            line = f"{SPEAKER_TAGS[speaker - 1]}: {rng.choice(utterances)}"
            turns.append(line)
            length += len(line) + 1
            # mostly alternate between speakers, sometimes jump to another one
            speaker = speaker % speakers + 1 if rng.random() < 0.8 else rng.randint(1, speakers)
        dialogue = "\n".join(turns)
        summary_target = max(20, int(len(dialogue) * SUMMARY_RATIO))
        words: list[str] = []
        while len(" ".join(words)) < summary_target:  # words of sample summaries, cut to length
            sentence = _TAG.sub(lambda m, n=speakers: SPEAKER_TAGS[(int(m.group(1)) - 1) % n], rng.choice(sentences))
            for word in sentence.split():
                words.append(word)
                if len(" ".join(words)) >= summary_target:
                    break
        summary = " ".join(words).rstrip(".,") + "."
        samples.append(Sample(fname=f"{prefix}_{i}", dialogue=dialogue, summaries=[summary], topic="합성"))
    return samples
