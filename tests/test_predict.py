"""Inference through the real CLI: a training run saves what mode=predict needs, predict writes the
submission in the test file's order, quantized generation on the CPU, the inference-speed sweep,
the run's plots, and model=solar_api against a local OpenAI-compatible server."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from summ.data.samples import bundled_sample_dir

from .conftest import assert_one_error_line, cli
from .test_solar import KEY, FakeSolar

SHORT = ["train.epochs=2", "inference=greedy", "inference.max_new_tokens=12"]


def rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def bart_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("bart") / "run"
    cli(f"hydra.run.dir={run}", "save_visualizations=true", *SHORT, timeout=600, code=0)
    return run


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("llama") / "run"
    cli("model=tiny_llama", f"hydra.run.dir={run}", *SHORT, timeout=600, code=0)
    return run


def _check_submission(pred: Path) -> None:
    test_fnames = [r["fname"] for r in rows(bundled_sample_dir() / "test.csv")]
    sub = rows(pred / "submission.csv")
    assert [r["fname"] for r in sub] == test_fnames  # every test row, in the file's order
    assert list(sub[0].keys()) == ["fname", "summary"]
    for r in sub:  # post-processed: no housekeeping tokens, single spaces
        assert "<pad>" not in r["summary"] and "</s>" not in r["summary"] and "  " not in r["summary"]


@pytest.mark.slow
def test_predict_from_a_trained_bart_run_reproduces_its_summaries_and_writes_the_submission(bart_run, tmp_path):
    saved = bart_run / "model"
    assert (saved / "model.safetensors").is_file() and (saved / "summ_config.yaml").is_file()
    cli("mode=predict", f"model.path={bart_run}", f"hydra.run.dir={tmp_path}", *SHORT, timeout=600, code=0)
    _check_submission(tmp_path)
    # the reloaded weights and tokenizer give the training run's own dev summaries
    assert [r["prediction"] for r in rows(tmp_path / "dev_predictions.csv")] == [
        r["prediction"] for r in rows(bart_run / "dev_predictions.csv")
    ]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["status"] == "ok" and m["mode"] == "predict" and m["predict"]["rows"] == 30
    assert m["eval"]["generation_ms_per_sample"] > 0 and m["eval"]["generation_samples_per_s"] > 0


@pytest.mark.slow
def test_predict_from_a_lora_run_loads_the_adapter_over_its_base(llama_run, tmp_path):
    saved = llama_run / "model"
    assert (saved / "adapter_config.json").is_file() and not (saved / "model.safetensors").exists()
    # no model=tiny_llama here: the run's saved config brings back the architecture and prompt
    cli("mode=predict", f"model.path={llama_run}", f"hydra.run.dir={tmp_path}", *SHORT, timeout=600, code=0)
    _check_submission(tmp_path)
    assert [r["prediction"] for r in rows(tmp_path / "dev_predictions.csv")] == [
        r["prediction"] for r in rows(llama_run / "dev_predictions.csv")
    ]
    assert json.loads((tmp_path / "metrics.json").read_text())["lora_adapter"] is True


@pytest.mark.slow
def test_quantized_generation_sweep_reports_speed_against_rouge(bart_run, tmp_path):
    cli(
        "-m",
        "preset=inference_speed",
        f"model.path={bart_run}",
        f"hydra.sweep.dir={tmp_path}",
        "inference.batch_size=16",
        "inference.sort_by_length=true",
        *SHORT[1:],
        timeout=600,
        code=0,
    )
    report = (tmp_path / "inference_report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ") and "| ok" in line]
    assert {line.split("|")[2].strip() for line in table} == {"none", "dynamic_int8", "bnb_8bit", "bnb_4bit"}
    assert "**pick**" in report and (tmp_path / "inference.png").stat().st_size > 10_000
    for d in sorted(p for p in tmp_path.iterdir() if p.name.isdigit()):
        m = json.loads((d / "metrics.json").read_text())
        assert m["eval"]["generation_ms_per_sample"] > 0
        preds = rows(d / "dev_predictions.csv")
        assert len(preds) == 30 and any(r["prediction"] for r in preds)  # quantized models still summarise


@pytest.mark.slow
def test_a_quantized_predict_run_compares_itself_with_unquantized(bart_run, tmp_path):
    cli(
        "mode=predict",
        f"model.path={bart_run}",
        f"hydra.run.dir={tmp_path}",
        "inference.quantization=dynamic_int8",
        "predict.submission=false",
        *SHORT[1:],
        timeout=600,
        code=0,
    )
    ev = json.loads((tmp_path / "metrics.json").read_text())["eval"]
    assert ev["quantization"] == "dynamic_int8" and ev["unquantized"]["n"] == ev["n"] == 30
    assert ev["speedup"] > 0 and abs(ev["rouge_mean_change"]) <= 1
    assert (
        ev["unquantized"]["model_bytes"]
        > json.loads((tmp_path / "metrics.json").read_text())["inference"]["model_bytes"]
    )


@pytest.mark.slow
def test_run_plots_have_their_pictures(bart_run):
    for name in ("loss.png", "throughput.png", "memory.png"):
        assert (bart_run / name).stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,expect",
    [
        (["mode=predict"], "set model.path="),
        (["mode=predict", "model.path=/nonexistent/run"], "holds no trained model"),
        (
            ["mode=predict", "model.path=/tmp", "inference.quantization=int3"],
            "inference.quantization=int3: Invalid value",
        ),
    ],
)
def test_predict_input_errors_are_one_line(tmp_path, args, expect):
    assert_one_error_line(cli(*args, f"hydra.run.dir={tmp_path}", timeout=600), expect, 2)


@pytest.mark.slow
def test_solar_api_model_scores_dev_and_writes_the_submission_without_leaking_the_key(tmp_path):
    fake = FakeSolar()
    try:
        cli(
            "model=solar_api",
            "mode=predict",
            f"solar.base_url={fake.base_url}",
            f"hydra.run.dir={tmp_path}",
            "solar.cache_dir=null",
            "solar.prompt_strategy=few_shot_chat",
            "solar.requests_per_minute=6000",
            env={"UPSTAGE_API_KEY": KEY},
            timeout=600,
            code=0,
        )
    finally:
        fake.close()
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["status"] == "ok" and 0 <= m["eval"]["rouge_mean"] <= 1 and m["eval"]["n"] == 30
    assert m["solar"]["requests_sent"] == 60  # 30 dev + 30 test dialogues
    _check_submission(tmp_path)
    assert all(r["headers"]["Authorization"] == f"Bearer {KEY}" for r in fake.requests)
    for f in tmp_path.rglob("*"):  # config, logs, metrics, predictions: the key is nowhere
        if f.is_file():
            assert KEY not in f.read_text(encoding="utf-8", errors="ignore"), f


@pytest.mark.slow
def test_solar_api_without_a_key_is_one_line(tmp_path):
    proc = cli(
        "model=solar_api",
        "solar.base_url=http://127.0.0.1:9/v1",
        "solar.cache_dir=null",
        f"hydra.run.dir={tmp_path}",
        env={"UPSTAGE_API_KEY": None},
    )
    assert_one_error_line(proc, "UPSTAGE_API_KEY", 2)


@pytest.mark.slow
def test_a_solar_run_is_an_ensemble_member_and_solar_is_an_augmentation_backend(bart_run, tmp_path):
    fake = FakeSolar()
    try:
        solar = tmp_path / "solar"
        cli(
            "model=solar_api",
            f"solar.base_url={fake.base_url}",
            f"hydra.run.dir={solar}",
            "solar.cache_dir=null",
            "solar.requests_per_minute=6000",
            env={"UPSTAGE_API_KEY": KEY},
            timeout=600,
            code=0,
        )
        cli(bart_run, solar, "--out", tmp_path / "ens", module="summ.inference.ensemble", code=0)
        assert len(rows(tmp_path / "ens" / "ensemble_predictions.csv")) == 30

        # back-translation through the API: ko->en then en->ko for every utterance of the chosen dialogues
        def translate(body):
            text = body["messages"][-1]["content"]
            return f"(en) {text}" if "English" in body["messages"][0]["content"] else text.replace("(en) ", "") + " 네."

        fake.answer = translate
        aug = tmp_path / "aug"
        cli(
            "augmentation=back_translation",
            "augmentation.ratio=0.05",
            "generation.kind=solar",
            f"solar.base_url={fake.base_url}",
            "solar.cache_dir=null",
            "generation.cache_dir=" + str(tmp_path / "gc"),
            "solar.requests_per_minute=6000",
            f"hydra.run.dir={aug}",
            "train.epochs=1",
            "eval.enabled=false",
            env={"UPSTAGE_API_KEY": KEY},
            timeout=600,
            code=0,
        )
    finally:
        fake.close()
    report = json.loads((aug / "metrics.json").read_text())["augmentation"]
    assert report["added"]["back_translation"] > 0 and not report["skipped"]
    prompts = " ".join(json.dumps(r["body"]["messages"], ensure_ascii=False) for r in fake.requests)
    assert "English" in prompts and "영어" in prompts  # both translation directions reached the server
