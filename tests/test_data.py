"""Prompt data: every source kind loads, templates fill, bad input gets a clear error, sharding is disjoint."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from detoxrl.train.config import DataConfig
from detoxrl.train.data import PromptSampler, build_prompts, load_rows


@pytest.fixture
def t5_tok(test_models):
    return AutoTokenizer.from_pretrained(test_models["t5"])


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_from_disk_folder_with_splits(test_models):
    rows = load_rows(str(test_models["dialogsum"]), "test")
    assert {"id", "dialogue", "summary", "topic"} <= set(rows.column_names) and len(rows) > 0
    with pytest.raises(KeyError, match="splits there"):
        load_rows(str(test_models["dialogsum"]), "nosuchsplit")


def test_local_files_and_folders(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", [{"text": "hello there"}, {"text": "good bye"}])
    assert len(load_rows(str(f), "train")) == 2
    assert len(load_rows(str(tmp_path), "train")) == 2          # folder with <split>.jsonl
    (tmp_path / "x.csv").write_text("text,label\nhi,1\nyo,0\n")
    assert load_rows(str(tmp_path / "x.csv"), "train")["label"] == [1, 0]
    with pytest.raises(FileNotFoundError):
        load_rows(str(tmp_path / "missing.jsonl"), "train")
    with pytest.raises(FileNotFoundError, match="test.jsonl"):
        load_rows(str(tmp_path), "test")


def test_template_truncation_and_no_fixed_padding(tmp_path, t5_tok):
    rows = load_rows(str(write_jsonl(tmp_path / "d.jsonl", [
        {"dialogue": "hi " * 300, "summary": "s1"}, {"dialogue": "short chat", "summary": "s2"}])), "train")
    cfg = DataConfig(dataset="x", text_field="dialogue", template="Summarize:\n{dialogue}\nSummary:",
                     max_prompt_tokens=20, reference_field="summary")
    ps = build_prompts(rows, cfg, t5_tok, "seq2seq", seed=0)
    assert len(ps.input_ids[0]) == 20 and ps.input_ids[0][-1] == t5_tok.eos_token_id   # truncated, EOS kept
    assert len(ps.input_ids[1]) < 20                                                       # never padded
    assert ps.texts[1].startswith("Summarize:") and ps.references == ["s1", "s2"]


def test_causal_prompts_keep_their_end_and_length_range(tmp_path, test_models):
    tok = AutoTokenizer.from_pretrained(test_models["gpt2"])
    rows = load_rows(str(write_jsonl(tmp_path / "d.jsonl", [{"text": "word " * 50 + "THEEND"}] * 3)), "train")
    ps = build_prompts(rows, DataConfig(dataset="x", text_field="text", template="{text}", max_prompt_tokens=8),
                       tok, "causal", 0)
    assert "THEEND" in ps.texts[0]
    ranged = build_prompts(rows, DataConfig(dataset="x", text_field="text", template="{text}", max_prompt_tokens=64,
                                            prompt_tokens_range=[2, 4]), tok, "causal", 0)
    assert all(2 <= len(ids) <= 4 for ids in ranged.input_ids)


def test_empty_and_short_rows_are_dropped_with_a_count(tmp_path, t5_tok):
    rows = load_rows(str(write_jsonl(tmp_path / "d.jsonl", [{"dialogue": ""}, {"dialogue": None},
                                                           {"dialogue": "x"}, {"dialogue": "a long enough chat"}])),
                     "train")
    ps = build_prompts(rows, DataConfig(dataset="x", text_field="dialogue", template="{dialogue}", min_text_chars=5),
                       t5_tok, "seq2seq", 0)
    assert len(ps) == 1 and ps.dropped == 3


def test_wrong_column_lists_the_columns(tmp_path, t5_tok):
    rows = load_rows(str(write_jsonl(tmp_path / "d.jsonl", [{"dialog": "hi"}])), "train")
    with pytest.raises(KeyError) as err:
        build_prompts(rows, DataConfig(dataset="x", text_field="dialogue"), t5_tok, "seq2seq", 0)
    assert "dialog" in str(err.value) and "data.text_field" in str(err.value)


def test_all_rows_filtered_is_an_error(tmp_path, t5_tok):
    rows = load_rows(str(write_jsonl(tmp_path / "d.jsonl", [{"dialogue": "hi"}])), "train")
    with pytest.raises(ValueError, match="no usable prompts"):
        build_prompts(rows, DataConfig(dataset="x", min_text_chars=100), t5_tok, "seq2seq", 0)


def test_sampler_shards_are_disjoint_deterministic_and_resumable():
    a = PromptSampler(20, per_rank=3, rank=0, world=2, seed=1)
    b = PromptSampler(20, per_rank=3, rank=1, world=2, seed=1)
    seen = []
    for _ in range(3):
        ia, ib = a.next_indices(), b.next_indices()
        assert not set(ia) & set(ib) and len(ia) == len(ib) == 3
        seen += ia + ib
    assert len(set(seen)) == 18                    # no repeats within the epoch
    state = a.state_dict()
    nxt = a.next_indices()                          # crosses into epoch 1 (18 + 6 > 20)
    assert a.epoch == 1
    c = PromptSampler(20, per_rank=3, rank=0, world=2, seed=1)
    c.load_state_dict(state)
    assert c.next_indices() == nxt
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PromptSampler(5, per_rank=3, rank=0, world=2, seed=1)
