"""A model folder that is not what it claims stops the run with one line before any training
(issue 21, items 1 and 7): no tokenizer of its own, a tokenizer that cannot write Korean, weights of
another architecture or of another size. A folder that is what it claims trains."""

from __future__ import annotations

import shutil

import pytest
import torch

from summ.errors import WeightsNotFound

from .conftest import assert_one_error_line, cli

SMALL_BART = dict(
    d_model=16,
    encoder_layers=1,
    decoder_layers=1,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
    max_position_embeddings=1024,
)
RUN = ["measure.steps=1", "measure.warmup_steps=0", "eval.enabled=false", "train.save_model=false"]


def _bart(vocab: int):
    from transformers import BartConfig, BartForConditionalGeneration

    from summ.modeling.models import tiny_tokenizer

    tok = tiny_tokenizer()
    ids = dict(
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(vocab_size=vocab, **SMALL_BART, **ids)), tok


def _llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )


def _english_tokenizer():
    """A BPE tokenizer that has never seen Hangul: Korean becomes <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(
        ["the quick brown fox jumps over the lazy dog"] * 50 + ["hello world, summarize this"] * 50,
        trainers.BpeTrainer(vocab_size=200, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Model folders, each what a user might point model.path at."""
    root = tmp_path_factory.mktemp("folders")
    made = {}
    good, tok = _bart(4032)
    good.save_pretrained(root / "good")
    tok.save_pretrained(root / "good")
    made["good"] = root / "good"
    good.save_pretrained(root / "no_tokenizer")  # config.json and weights only
    made["no_tokenizer"] = root / "no_tokenizer"
    good.save_pretrained(root / "english")
    _english_tokenizer().save_pretrained(root / "english")
    made["english"] = root / "english"
    # weights of a Llama with the same vocabulary, under the BART's config.json and tokenizer
    (root / "other_arch").mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "good" / f, root / "other_arch" / f)
    _llama(4032).save_pretrained(root / "llama_weights")
    shutil.copy(root / "llama_weights" / "model.safetensors", root / "other_arch" / "model.safetensors")
    made["other_arch"] = root / "other_arch"
    # weights of a BART with another vocabulary, under the first one's config.json
    (root / "other_size").mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "good" / f, root / "other_size" / f)
    _bart(3008)[0].save_pretrained(root / "small_vocab")
    shutil.copy(root / "small_vocab" / "model.safetensors", root / "other_size" / "model.safetensors")
    made["other_size"] = root / "other_size"
    return made


@pytest.mark.parametrize(
    "name,said",
    [
        ("no_tokenizer", "its tokenizer (RobertaTokenizer, 20 ids) keeps 0% of the Korean"),  # 5 + the 15 masked
        ("english", "keeps 0% of the Korean in the bundled sample"),
        ("other_arch", "its weights do not fit its config.json (BartForConditionalGeneration): "),
        ("other_size", "2 of another shape (model.shared.weight: 3008x16 in the file, 4032x16 in the config)"),
    ],
)
def test_a_folder_that_is_not_what_it_claims_stops_before_training(run_job, folders, name, said):
    with pytest.raises(WeightsNotFound) as info:
        run_job("model=kobart", f"model.path={folders[name]}", *RUN)
    line = str(info.value)
    assert said in line and str(folders[name]) in line and "\n" not in line, line
    if name == "other_arch":
        assert "missing, which would train from random values" in line and "left over" in line


def test_a_folder_that_is_what_it_claims_trains_and_is_not_random(run_job, folders):
    m, _ = run_job("model=kobart", f"model.path={folders['good']}", *RUN)
    assert m["status"] == "ok" and m["random_init"] is False


@pytest.mark.slow
def test_the_command_line_says_one_line_and_exits_2_without_transformers_load_table(folders, tmp_path):
    for name in ("no_tokenizer", "other_size"):
        proc = cli("model=kobart", f"model.path={folders[name]}", *RUN, f"hydra.run.dir={tmp_path / name}")
        assert_one_error_line(proc, "", 2)
        assert proc.stderr.count("error:") == 1  # nowhere else either
        assert "LOAD REPORT" not in proc.stdout + proc.stderr and "MISMATCH" not in proc.stdout + proc.stderr
    # mode=predict reads a plain weights folder the same way
    proc = cli(
        "mode=predict", "model=kobart", f"model.path={folders['no_tokenizer']}", f"hydra.run.dir={tmp_path / 'predict'}"
    )
    assert proc.returncode == 2 and "keeps 0% of the Korean" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "predict" / "submission.csv").exists()
