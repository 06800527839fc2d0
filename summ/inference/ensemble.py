"""Reducing several candidate summaries of one dialogue to one.

- mbr (minimum Bayes risk): the candidate with the highest mean ROUGE against the other
  candidates, i.e. the one the others agree with most.
- weighted: MBR where each member's agreement counts by its dev ROUGE.
- stacking: a selector (ridge regression on reference-free features) trained on out-of-fold
  data, where each K-fold member's top beams for its held-out dialogues are scored against the
  references; it then picks one of the members' summaries per dev dialogue.
- logit_avg: no selection at all; one beam search over the members' averaged next-token
  log-probabilities (LogitAverage below), for members that share a tokenizer.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from summ.config import RougeTokenizer
from summ.console import OneLineParser
from summ.files import WriteFailed
from summ.inference.scoring import pair_rouge_mean, rouge_scores
from summ.run_folder import (
    DEV_PREDICTIONS_FILE,
    ENSEMBLE_PREDICTIONS_FILE,
    ENSEMBLE_REPORT,
    job_config,
    read_predictions,
    write_report,
)


def mbr_select(candidates: Sequence[str], weights: Sequence[float] | None = None) -> int:
    """Index of the MBR choice among candidates (ties: the earliest)."""
    n = len(candidates)
    if n == 1:
        return 0
    w = list(weights) if weights is not None else [1.0] * n
    best, best_score = 0, float("-inf")
    for i in range(n):
        total = sum(w[j] for j in range(n) if j != i)
        score = sum(w[j] * pair_rouge_mean(candidates[i], candidates[j]) for j in range(n) if j != i)
        score = score / total if total else 0.0
        if score > best_score + 1e-12:
            best, best_score = i, score
    return best


# --------------------------------------------------------------------------- stacking

FEATURES = ("bias", "agreement", "length_vs_median", "abs_length_gap", "speaker_tags", "ends_with_period")


def candidate_features(candidates: Sequence[str]) -> list[list[float]]:
    """Per candidate, features that need no reference: its agreement with the other candidates
    (mean ROUGE against them), its length against the set's median, how many speaker tags it
    names, and whether it ends like a finished sentence."""
    import re
    import statistics

    lengths = [max(len(c), 1) for c in candidates]
    median = statistics.median(lengths)
    rows = []
    for i, c in enumerate(candidates):
        others = [pair_rouge_mean(c, o) for j, o in enumerate(candidates) if j != i]
        rows.append(
            [
                1.0,
                sum(others) / len(others) if others else 1.0,
                lengths[i] / median,
                abs(lengths[i] - median) / median,
                min(len(set(re.findall(r"#Person\d#", c))), 4) / 4,
                1.0 if c.rstrip().endswith(("다.", ".")) else 0.0,
            ]
        )
    return rows


def fit_selector(groups: Sequence[tuple[Sequence[str], float]], ridge: float = 1e-2) -> list[float]:
    """Least-squares (ridge) weights that predict a candidate's ROUGE against the reference from
    its features. `groups`: (candidate set, per-candidate ROUGE) pairs from out-of-fold data."""
    import numpy as np

    xs, ys = [], []
    for cands, targets in groups:
        xs += candidate_features(cands)
        ys += list(targets)
    x, y = np.asarray(xs), np.asarray(ys)
    w = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ y)
    return [float(v) for v in w]


def stack_select(candidates: Sequence[str], weights: Sequence[float]) -> int:
    """Index of the candidate the selector scores highest (ties: the earliest)."""
    scores = [sum(w * f for w, f in zip(weights, row)) for row in candidate_features(candidates)]
    return max(range(len(candidates)), key=lambda i: (scores[i], -i))


# --------------------------------------------------------------------------- logit averaging


class LogitAverage:
    """A LogitsProcessor for the first member's generate(): at every decoding step the other
    members score the same prefixes and the next-token log-probabilities are averaged, so beam
    search runs on the ensemble's distribution. Members must share the tokenizer. The other
    members recompute each prefix in full (no KV cache): exact, and O(length^2) in their cost.
    """

    def __init__(self, members: Sequence, inputs: dict, kind: str, num_beams: int):
        import torch

        self.members, self.kind = list(members), kind
        reps = max(num_beams, 1)
        self.mask = inputs["attention_mask"].repeat_interleave(reps, dim=0)
        self.prompt_len = inputs["input_ids"].size(1)
        self.encoder_outputs = []
        if kind == "seq2seq":
            with torch.no_grad():
                for m in self.members:
                    enc = m.get_encoder()(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
                    enc.last_hidden_state = enc.last_hidden_state.repeat_interleave(reps, dim=0)
                    self.encoder_outputs.append(enc)

    def __call__(self, input_ids, scores):
        import torch

        total = scores.float().log_softmax(-1)
        with torch.no_grad():
            for i, m in enumerate(self.members):
                if self.kind == "seq2seq":
                    out = m(
                        encoder_outputs=self.encoder_outputs[i],
                        attention_mask=self.mask,
                        decoder_input_ids=input_ids,
                        use_cache=False,
                    )
                else:
                    new = input_ids.size(1) - self.prompt_len
                    mask = torch.cat([self.mask, self.mask.new_ones(self.mask.size(0), new)], dim=1)
                    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                    out = m(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
                total = total + out.logits[:, -1, :].float().log_softmax(-1)
        return (total / (1 + len(self.members))).log_softmax(-1).to(scores.dtype)


# --------------------------------------------------------------------------- across runs


def _run_rouge_tokenizer(run: Path) -> RougeTokenizer:
    """The ROUGE tokenizer a run was scored with (its saved config), whitespace by default."""
    name = (job_config(run).get("eval") or {}).get("rouge_tokenizer")
    return RougeTokenizer[name] if name in RougeTokenizer.__members__ else RougeTokenizer.whitespace


def main(argv: Sequence[str] | None = None) -> int:
    """summ-ensemble [--strategy mbr|weighted] RUN_DIR RUN_DIR ...   (python -m summ.inference.ensemble)

    Ensembles the dev predictions (dev_predictions.csv) of finished runs over the same dev set;
    weighted uses each run's dev ROUGE (every reference, the runs' own eval.rouge_tokenizer). Prints
    each member's ROUGE and the ensemble's; writes ensemble_predictions.csv and ensemble_report.md
    into the first run's folder (or --out), an earlier ensemble's kept beside them."""
    ap = OneLineParser(prog="summ-ensemble", description=main.__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders holding dev_predictions.csv")
    ap.add_argument("--strategy", choices=("mbr", "weighted"), default="mbr")
    ap.add_argument("--out", default=None, help="folder for the ensemble's files (default: the first run's)")
    args = ap.parse_args(argv)
    runs = list({Path(r).resolve(): Path(r) for r in args.runs}.values())  # one folder named twice is one member
    if len(runs) < 2:
        print(
            f"error: an ensemble needs at least two runs and {'this is one' if runs else 'none was given'} "
            f"({', '.join(map(str, runs))}): name two or more run folders",
            file=sys.stderr,
        )
        return 2
    members = []
    for run in runs:
        rows = read_predictions(run)
        if rows is None:
            print(
                f"error: {run / DEV_PREDICTIONS_FILE} not found: ensemble runs that evaluated with generation on",
                file=sys.stderr,
            )
            return 2
        lacking = [c for c in ("fname", "prediction") if rows and c not in rows[0]]
        if lacking:
            print(
                f"error: {run / DEV_PREDICTIONS_FILE} has no {' or '.join(lacking)} column: ensemble the "
                f"dev_predictions.csv that training runs write",
                file=sys.stderr,
            )
            return 2
        members.append((run, rows))
    fnames = [r["fname"] for r in members[0][1]]
    if any([r["fname"] for r in rows] != fnames for _, rows in members):
        print("error: the runs predicted different dev sets: ensemble runs over the same data", file=sys.stderr)
        return 2
    refs = [json.loads(r["all_references"]) if r.get("all_references") else [r["reference"]] for r in members[0][1]]
    tokenizers = {_run_rouge_tokenizer(run) for run, _ in members}
    if len(tokenizers) > 1:
        print("error: the runs scored ROUGE with different eval.rouge_tokenizer settings", file=sys.stderr)
        return 2
    tokenizer = tokenizers.pop()
    member_scores = [rouge_scores([r["prediction"] for r in rows], refs, tokenizer) for _, rows in members]
    weights = [max(s["rouge_mean"], 1e-6) for s in member_scores] if args.strategy == "weighted" else None
    chosen = []
    for i in range(len(fnames)):
        cands = [rows[i]["prediction"] for _, rows in members]
        chosen.append(cands[mbr_select(cands, weights)])
    ens = rouge_scores(chosen, refs, tokenizer)
    out = Path(args.out) if args.out else members[0][0]
    lines = [
        f"# Ensemble ({args.strategy}) of {len(members)} runs over {len(fnames)} dev dialogues",
        "",
        "| member | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE mean |",
        "|---|---:|---:|---:|---:|",
    ]
    for (run, _), s in zip(members, member_scores):
        lines.append(f"| {run} | {s['rouge1']:.4f} | {s['rouge2']:.4f} | {s['rougeL']:.4f} | {s['rouge_mean']:.4f} |")
    lines.append(
        f"| **ensemble** | {ens['rouge1']:.4f} | {ens['rouge2']:.4f} | {ens['rougeL']:.4f} | "
        f"**{ens['rouge_mean']:.4f}** |"
    )
    report = "\n".join(lines) + "\n"
    rows = [[f, p, r[0], json.dumps(r, ensure_ascii=False)] for f, p, r in zip(fnames, chosen, refs)]
    if not _write(out, report, rows):
        return 2
    print(report)
    return 0


def _write(out: Path, report: str, rows: list[list[str]]) -> bool:
    """The ensemble's report and predictions into `out`; an earlier ensemble's files (another
    strategy, other members) are kept beside them. False, said in one line, when `out` cannot take them."""
    text = io.StringIO()
    csv.writer(text).writerows([["fname", "prediction", "reference", "all_references"]] + rows)
    try:
        write_report(out, ENSEMBLE_REPORT, report, keep_earlier=True)
        write_report(out, ENSEMBLE_PREDICTIONS_FILE, text.getvalue(), keep_earlier=True)
    except WriteFailed as exc:
        print(f"error: {exc}: give --out a folder that can be written", file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
