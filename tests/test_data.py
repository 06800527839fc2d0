"""Data: the competition CSV format, masked tokens, causal prompt masking, padding, sampling,
and the synthetic generator's length distribution."""

from __future__ import annotations

import statistics

import pytest

from summ.config import ModelKind
from summ.data.sampler import EpochSampler
from summ.data.samples import MASKED_TOKENS, Sample, bundled_sample_dir, read_csv
from summ.data.tokenize import IGNORE_INDEX, Collator, Encoder, TokenizedDataset, batch_token_counts
from summ.errors import DataError
from summ.modeling.models import tiny_tokenizer


def test_reads_bom_crlf_and_multiline_quoted_fields(tmp_path):
    path = tmp_path / "train.csv"
    raw = (
        "fname,dialogue,summary,topic\r\n"
        '"train_0","#Person1#: 안녕하세요.\r\n#Person2#: 네, 안녕하세요.","#Person1#과 #Person2#가 인사합니다.","인사"\r\n'  # noqa: E501
        'train_1,"#Person1#: 전화번호는 #PhoneNumber#입니다.\n#Person2#: 알겠습니다.",#Person1#이 번호를 알려줍니다.,연락\r\n'  # noqa: E501
    )
    path.write_bytes("\ufeff".encode() + raw.encode("utf-8"))
    rows = read_csv(path, need_summary=True)
    assert [r.fname for r in rows] == ["train_0", "train_1"]
    assert rows[0].dialogue == "#Person1#: 안녕하세요.\n#Person2#: 네, 안녕하세요."
    assert rows[1].summaries == ["#Person1#이 번호를 알려줍니다."] and rows[0].topic == "인사"


def test_several_reference_columns(tmp_path):
    path = tmp_path / "dev.csv"
    path.write_text("fname,dialogue,summary1,summary2,summary3\nd0,#Person1#: 네.,가,나,다\n", encoding="utf-8")
    assert read_csv(path, need_summary=False)[0].summaries == ["가", "나", "다"]


def test_missing_column_is_one_clear_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("fname,dialogue\nx,#Person1#: 네.\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.csv: missing column\(s\) summary") as err:
        read_csv(path, need_summary=True)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="file not found"):
        read_csv(tmp_path / "nope.csv", need_summary=True)


@pytest.mark.parametrize("name", ["train.csv", "dev.csv", "test.csv"])
@pytest.mark.parametrize(
    "header", ["fname,dialogue,summary\n", "\ufefffname,dialogue,summary\r\n", "fname,dialogue,summary"]
)
def test_a_csv_with_a_header_and_no_rows_is_one_line_naming_it(tmp_path, run_job, name, header):
    """A header alone (with or without BOM and line end) once ended in an IndexError traceback."""
    import shutil

    from summ.data.samples import bundled_sample_dir

    for f in ("train.csv", "dev.csv", "test.csv"):
        shutil.copy(bundled_sample_dir() / f, tmp_path / f)
    (tmp_path / name).write_text(header if name != "test.csv" else header.replace(",summary", ""), encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_csv(tmp_path / name, need_summary=name != "test.csv")
    assert (
        str(err.value) == f"{tmp_path / name}: no rows under its header; give the file its samples, or point "
        f"data.dir at the folder that has them"
    )
    if name == "dev.csv" and header.endswith("\n") and "\ufeff" not in header:  # the whole run, once
        with pytest.raises(DataError, match="no rows under its header"):
            run_job("data=dialogsum_ko", f"data.dir={tmp_path}", "measure.steps=1")


def test_bundled_sample_is_competition_shaped():
    folder = bundled_sample_dir()
    train = read_csv(folder / "train.csv", need_summary=True)
    dev = read_csv(folder / "dev.csv", need_summary=True)
    test = read_csv(folder / "test.csv", need_summary=False)
    assert len(train) >= 120 and len(dev) >= 30 and len(test) >= 30
    assert all(s.summaries == [] for s in test)
    for s in train + dev:
        lines = s.dialogue.split("\n")
        assert all(line.startswith("#Person") for line in lines), s.fname
        assert s.summary and len(s.summary) < len(s.dialogue)
    speakers = {len({line.split(":")[0] for line in s.dialogue.split("\n")}) for s in train}
    assert {2, 3, 4} <= speakers
    assert sum(any(t in s.dialogue for t in MASKED_TOKENS[7:]) for s in train) >= 5


def test_masked_tokens_are_single_tokens_and_survive_decoding():
    tok = tiny_tokenizer()
    for t in MASKED_TOKENS:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    text = "#Person1#은 #Person2#에게 #PhoneNumber#로 연락하기로 합니다."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


def test_causal_prompt_is_masked_and_summary_ends_with_eos():
    tok = tiny_tokenizer()
    enc = Encoder(tok, ModelKind.causal, "### 대화:\n{dialogue}\n### 요약:\n", 512, 100)
    f = enc.encode(Sample("a", "#Person1#: 안녕하세요.\n#Person2#: 네.", ["#Person1#이 인사합니다."]))
    assert len(f.input_ids) == len(f.labels)
    assert f.labels[: f.prompt_len] == [IGNORE_INDEX] * f.prompt_len
    assert f.labels[f.prompt_len :] == f.input_ids[f.prompt_len :] and f.labels[-1] == tok.eos_token_id
    assert f.input_ids[0] == tok.bos_token_id


def test_truncation_limits():
    tok = tiny_tokenizer()
    long = "#Person1#: " + "아주 긴 이야기입니다. " * 200
    for kind in ModelKind:
        enc = Encoder(tok, kind, "{dialogue}", 32, 8)
        f = enc.encode(Sample("a", long, ["요약 " * 50]))
        n_target = sum(1 for x in f.labels if x != IGNORE_INDEX)
        assert n_target <= 8
        assert f.prompt_len <= 32 + 2


def test_collator_pads_dynamically_and_shifts_decoder_inputs():
    tok = tiny_tokenizer()
    enc = Encoder(tok, ModelKind.seq2seq, "{dialogue}", 512, 100)
    feats = [enc.encode(Sample(str(i), "#Person1#: " + "네. " * (i + 1), ["요약입니다."])) for i in range(3)]
    batch = Collator(tok.pad_token_id, ModelKind.seq2seq, decoder_start_token_id=tok.eos_token_id)(feats)
    longest = max(len(f.input_ids) for f in feats)
    assert batch["input_ids"].shape == (3, longest)
    assert batch["attention_mask"].sum().item() == sum(len(f.input_ids) for f in feats)
    assert (batch["decoder_input_ids"][:, 0] == tok.eos_token_id).all()
    assert (
        batch["decoder_input_ids"][:, 1:][batch["labels"][:, :-1] != IGNORE_INDEX]
        == batch["labels"][:, :-1][batch["labels"][:, :-1] != IGNORE_INDEX]
    ).all()
    tokens, pads = batch_token_counts(batch)
    assert tokens + pads == batch["input_ids"].numel() + batch["labels"].numel()
    assert pads == (batch["attention_mask"] == 0).sum().item()  # equal-length summaries: no decoder pad


def test_sampler_order_is_the_same_for_any_batch_size_and_changes_per_epoch():
    lengths = list(range(100))
    a = list(EpochSampler(lengths, seed=3, batch_size=8))
    assert a == list(EpochSampler(lengths, seed=3, batch_size=2))
    s = EpochSampler(lengths, seed=3)
    s.set_epoch(1)
    assert sorted(list(s)) == sorted(a) and list(s) != a


def test_length_grouping_cuts_padding():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(20, 500) for _ in range(2000)]

    def padded_fraction(order, bs=16):
        pad = real = 0
        for i in range(0, len(order) - bs + 1, bs):
            chunk = [lengths[j] for j in order[i : i + bs]]
            pad += max(chunk) * bs - sum(chunk)
            real += sum(chunk)
        return pad / (pad + real)

    plain = padded_fraction(list(EpochSampler(lengths, seed=0, batch_size=16)))
    grouped = padded_fraction(list(EpochSampler(lengths, seed=0, group_by_length=True, batch_size=16)))
    assert grouped < plain / 5


def test_synthetic_follows_competition_lengths():
    from summ.data.synthetic import generate

    data = generate(3000, seed=0)
    lengths = [len(s.dialogue) for s in data]
    assert 370 <= statistics.fmean(lengths) <= 450
    assert 200 <= statistics.median(lengths) <= 420
    assert max(lengths) > 1500
    ratios = [len(s.summary) / len(s.dialogue) for s in data]
    assert 0.12 <= statistics.median(ratios) <= 0.2
    assert generate(50, seed=1) == generate(50, seed=1)
    for s in data[:200]:
        n = len({line.split(":")[0] for line in s.dialogue.split("\n")})
        tags = {t for t in MASKED_TOKENS[:7] if t in s.summary}
        assert all(int(t[7]) <= 7 for t in tags) and 1 <= n <= 7


def test_tokenized_dataset_lengths_match_features():
    tok = tiny_tokenizer()
    enc = Encoder(tok, ModelKind.seq2seq, "{dialogue}", 512, 100)
    ds = TokenizedDataset([Sample("a", "#Person1#: 네.", ["요약."])], enc)
    assert ds.lengths() == [len(ds[0].input_ids)]
