"""One Optuna study on shared PostgreSQL storage, searched by two sweep workers at once, as two
machines would: every trial of both lands in the study, complete and numbered once, and each
worker's sweep folder holds its own jobs.

Needs a PostgreSQL server: .ci/run starts one (.ci/start_postgres.sh) and exports its URL as
SUMM_TEST_POSTGRES_URL; without it this test is skipped."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_URL = os.environ.get("SUMM_TEST_POSTGRES_URL")
SMALL = ["data.synthetic_train_size=600", "measure.steps=2", "measure.warmup_steps=1"]
TRIALS_PER_WORKER = 2
# one sampler seed per worker (see below); these two draw four different start-up cells, all
# small (micro-batch <= 4, no accumulation past 2), which keeps the test short on 2 CPU cores
SEEDS = {"w0": 6, "w1": 37}


@pytest.mark.slow
@pytest.mark.skipif(
    not POSTGRES_URL,
    reason="SUMM_TEST_POSTGRES_URL is unset: no PostgreSQL server "
    "(`export SUMM_TEST_POSTGRES_URL=$(bash .ci/start_postgres.sh)` starts one, as .ci/run does)",
)
def test_two_workers_share_one_study_on_postgres(tmp_path):
    import optuna

    study_name = f"test-distributed-{uuid.uuid4().hex[:12]}"
    # No study is created beforehand: both workers start at the same instant, and on CI's fresh
    # database both try to create Optuna's tables (summ.sweeps.storage.prepare_storage lets the loser wait
    # and retry instead of dying), then both open the same study (load_if_exists).
    try:
        # Each worker its own sampler seed: with the preset's one seed both would draw the same
        # random start-up trials and measure the same cells twice.
        workers = {
            name: subprocess.Popen(
                [
                    sys.executable,
                    "run.py",
                    "-m",
                    "preset=optuna_step_time",
                    f"hydra.sweeper.storage={POSTGRES_URL}",
                    f"hydra.sweeper.study_name={study_name}",
                    f"hydra.sweeper.n_trials={TRIALS_PER_WORKER}",
                    f"hydra.sweeper.sampler.seed={seed}",
                    f"hydra.sweep.dir={tmp_path / name}",
                    *SMALL,
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                # one thread each: two torch processes spinning on the same cores slow each other tenfold
                env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
            )
            for name, seed in SEEDS.items()
        }
        try:
            logs = {name: proc.communicate(timeout=300)[0] for name, proc in workers.items()}
        finally:
            for proc in workers.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        for name, proc in workers.items():
            assert proc.returncode == 0, f"worker {name} failed:\n{logs[name][-4000:]}"
            assert f"Study name: {study_name}" in logs[name]

        trials = optuna.load_study(study_name=study_name, storage=POSTGRES_URL).get_trials(deepcopy=False)
        assert len(trials) == len(workers) * TRIALS_PER_WORKER, [(t.number, t.state) for t in trials]
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), [t.state for t in trials]
        assert sorted(t.number for t in trials) == list(range(len(trials)))  # none lost, none numbered twice
        assert all(0 < t.value < 1e6 for t in trials)  # measured seconds per sample, not the penalty

        # each worker ran its own jobs in its own sweep folder and wrote its results there ...
        for name in workers:
            sweep = tmp_path / name
            assert sorted(p.parent.name for p in sweep.glob("*/metrics.json")) == [
                str(job) for job in range(TRIALS_PER_WORKER)
            ], name
            assert (sweep / "optimization_results.yaml").is_file()
            assert (sweep / "best_overrides.txt").read_text().splitlines()[-1].startswith("python run.py ")
        # ... each trial carries the attributes its own job recorded ...
        assert all(t.user_attrs.get("status") == "ok" for t in trials)
        assert {t.user_attrs.get("job_dir") for t in trials} == {
            str(tmp_path / name / str(job)) for name in workers for job in range(TRIALS_PER_WORKER)
        }
        # ... and the two really searched at once: each worker's span of trials overlaps the other's
        spans = [[t for t in trials if Path(t.user_attrs["job_dir"]).parent.name == name] for name in workers]
        (a0, a1), (b0, b1) = ((min(t.datetime_start for t in ts), max(t.datetime_complete for t in ts)) for ts in spans)
        assert a0 < b1 and b0 < a1, (a0, a1, b0, b1)
    finally:
        optuna.delete_study(study_name=study_name, storage=POSTGRES_URL)
