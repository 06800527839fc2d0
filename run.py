"""summ: fine-tune a Korean dialogue summarizer and measure what each batch configuration costs.

Single run (tiny model, bundled data, offline):
    python run.py
    python run.py model=llama batch=bs8_ga1 data=dialogsum_ko data.dir=/data model.path=/models/bllossom-3b
Multirun over batch size x gradient accumulation:
    python run.py -m batch.batch_size=2,4,8,16,32 batch.gradient_accumulation_steps=1,2 measure.steps=5
Optuna search (hydra-optuna-sweeper):
    python run.py -m preset=optuna_step_time
Several processes (DDP through Accelerate; gloo on CPU):
    accelerate launch --cpu --num_processes 2 run.py measure.steps=5 eval.enabled=false

The config is composed from conf/ (schemas in summ/config.py); the work is summ.app.run
(a single run: summ.single_run.run_single; a sweep's job: summ.sweeps.trials.run_trial; both run
summ.pipeline.run_job).
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded at run time
# no per-file progress bars from transformers / huggingface_hub ("Loading weights", "Writing model
# shards"): read before they are imported; our own progress goes to the log
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from summ import distributed  # noqa: E402
from summ.app import check_environment, guard_hydra, register  # noqa: E402

register()
guard_hydra()


# Targets the configs may instantiate: our callback, Hydra's own plugins, Optuna's samplers, logging.
TRUSTED_TARGETS = ["summ.*", "hydra_plugins.*", "hydra.*", "optuna.*", "logging.*"]


# No version_base: Hydra 1.4 deprecated the argument; left out, it means this release's defaults.
@hydra.main(config_path="conf", config_name="config", execution_whitelist=TRUSTED_TARGETS)
def main(cfg: DictConfig) -> float:
    from summ.app import run

    return run(cfg)


if __name__ == "__main__":
    check_environment()
    requested = distributed.requested_cpu_processes()
    if requested:
        sys.exit(distributed.relaunch(*requested))
    distributed.share_run_stamp()
    sys.argv += distributed.hydra_overrides_for_this_process()
    main()
