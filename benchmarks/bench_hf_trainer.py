"""summ's loop against the Hugging Face Seq2SeqTrainer on the same tiny BART.

Same init, data, batches and order (the Trainer is given summ's sampler and collator), batch
size, dynamic padding, fp32, AdamW groups, linear schedule, clipping; dropout off so the losses
can be compared step for step. Samples/s is timed the same way for both: wall time from the end
of one optimizer step to the end of the next (data loading included), warm-up steps excluded.
Target: ratio >= 1.0, with the loss after N steps equal within 1e-3.

    python benchmarks/bench_hf_trainer.py [--rounds 9] [--steps 30]
"""

from __future__ import annotations

import math
import tempfile

from common import DUEL_OVERRIDES, duel, same_inputs

OVERRIDES = [*DUEL_OVERRIDES, "model.tiny.dropout=0"]


def hf_trainer(steps: int) -> dict:
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

    from summ.data.sampler import EpochSampler
    from summ.measure.timing import now

    inputs = same_inputs(OVERRIDES + [f"measure.steps={steps}"])
    cfg, ds = inputs.cfg, inputs.dataset

    def collator(features):  # the Trainer passes every key to the model: leave out summ's host-side counts
        return {k: v for k, v in inputs.collator(features).items() if k != "counts"}

    sampler = EpochSampler(ds.lengths(), seed=cfg.train.seed)
    warm = cfg.measure.warmup_steps
    total = warm + steps

    class Timer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(now())

    class SameSampler(Seq2SeqTrainer):
        def _get_train_sampler(self, *a, **k):
            return sampler

    timer = Timer()
    with tempfile.TemporaryDirectory() as tmp:
        args = Seq2SeqTrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=cfg.batch.batch_size,
            max_steps=total,
            learning_rate=cfg.train.learning_rate,
            lr_scheduler_type="linear",
            warmup_steps=math.ceil(cfg.train.warmup_ratio * total),
            weight_decay=cfg.train.weight_decay,
            adam_epsilon=cfg.train.adam_epsilon,
            max_grad_norm=cfg.train.max_grad_norm,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_drop_last=True,
            seed=cfg.train.seed,
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        trainer = SameSampler(
            model=inputs.model, args=args, train_dataset=ds, data_collator=collator, callbacks=[timer]
        )
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    seconds = timer.ends[-1] - timer.ends[warm - 1]
    return {"samples_per_s": steps * cfg.batch.batch_size / seconds, "final_loss": losses[-1]}


def main() -> None:
    duel(__doc__, "hf_trainer", "HF Seq2SeqTrainer", "HF Trainer", hf_trainer, OVERRIDES, "fp32, ", ">= 1.0")


if __name__ == "__main__":
    main()
