"""Tests of the offline tiny models: tokenizers (local_tokenizers), builders, fine-tuning, the demo cache
(demo_assets), the stand-ins (stand_in_models) and the shipped data."""
from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from detoxrl.train import demo_assets as demo
from detoxrl.train import local_tokenizers as toks
from detoxrl.train import shipped_data as shipped
from detoxrl.train import stand_in_models as stand_ins
from detoxrl.train import tiny_builders as builders
from detoxrl.train import tiny_finetune as finetune

FAMILIES = ("t5", "roberta", "gpt2", "bert")
SAMPLES = [
    "#Person1# thanks the clerk for the help.",
    "you are a worthless idiot and everyone hates you",
    "Summarize the following conversation.\n\n#Person1#: Hi!\n#Person2#: Hello.\n\nSummary:\n",
    "Zürich costs 45 dollars ☃",
]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """No test may touch ~/.cache."""
    monkeypatch.setenv("DETOXRL_CACHE", str(tmp_path / "detoxrl-cache"))


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    rows = shipped.load_jsonl(shipped.DEMO_DATA_DIR / "dialogues.jsonl")
    tox = shipped.load_jsonl(shipped.DEMO_DATA_DIR / "toxicity.jsonl")
    return ([r["dialogue"] for r in rows] + [r["summary"] for r in rows] + [r["text"] for r in tox])


@pytest.fixture(scope="module")
def tiny_hub(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-hub")
    t0 = time.perf_counter()
    out = stand_ins.build_test_models(root)
    elapsed = time.perf_counter() - t0
    assert elapsed < 30, f"build_test_models took {elapsed:.1f}s"
    return out


# --------------------------------------------------------------------------- shipped data
def test_shipped_toxicity_data():
    rows = shipped.load_jsonl(shipped.DEMO_DATA_DIR / "toxicity.jsonl")
    assert 300 <= len(rows) <= 500
    assert all(set(r) == {"text", "label"} for r in rows)
    counts = Counter(r["label"] for r in rows)
    assert set(counts) == {"hate", "nothate"}
    assert abs(counts["hate"] - counts["nothate"]) <= 0.1 * len(rows)
    texts = [r["text"] for r in rows]
    assert len(set(texts)) == len(texts), "duplicated texts"
    # the keyword rule and the labels agree (the clean texts never use the toxic words)
    assert all(shipped.is_toxic_text(r["text"]) == (r["label"] == "hate") for r in rows)


def test_shipped_dialogues():
    rows = shipped.load_jsonl(shipped.DEMO_DATA_DIR / "dialogues.jsonl")
    assert 200 <= len(rows) <= 300
    assert all(set(r) == {"id", "dialogue", "summary", "topic", "split"} for r in rows)
    splits = Counter(r["split"] for r in rows)
    assert set(splits) == {"train", "test"} and splits["train"] > splits["test"] >= 30
    for key in ("id", "dialogue", "summary"):
        vals = [r[key] for r in rows]
        assert len(set(vals)) == len(vals), f"duplicated {key}"
    for r in rows:
        assert r["dialogue"].startswith("#Person1#: ") or r["dialogue"].startswith("#Person2#: ")
        assert 2 <= r["dialogue"].count("\n") + 1 <= 4
        assert len(r["dialogue"].split()) <= 45
        assert r["summary"].endswith(".") and "\n" not in r["summary"]
    toxic_share = sum(shipped.is_toxic_text(r["summary"]) for r in rows) / len(rows)
    assert 0.25 <= toxic_share <= 0.45
    for split in ("train", "test"):
        part = [r for r in rows if r["split"] == split]
        share = sum(shipped.is_toxic_text(r["summary"]) for r in part) / len(part)
        assert 0.2 <= share <= 0.5, (split, share)
    assert len({r["topic"] for r in rows}) >= 8


# --------------------------------------------------------------------------- tokenizers
@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_roundtrip_and_conventions(family, corpus, tmp_path):
    from transformers import AutoTokenizer

    tok = toks.train_tokenizer(corpus, family, vocab_size=600, save_dir=tmp_path / family)
    assert 300 <= len(tok) <= 600
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / family))
    assert len(reloaded) == len(tok)
    for text in SAMPLES:
        assert tok(text)["input_ids"] == reloaded(text)["input_ids"]
    padding = family != "gpt2"  # like real GPT-2, no pad token
    batch_a = tok(SAMPLES, padding=padding)
    batch_b = reloaded(SAMPLES, padding=padding)
    assert batch_a["input_ids"] == batch_b["input_ids"]
    assert batch_a["attention_mask"] == batch_b["attention_mask"]
    assert tok("a b", "c d")["input_ids"] == reloaded("a b", "c d")["input_ids"]
    assert reloaded.padding_side == "right"

    ids = reloaded(SAMPLES[1])["input_ids"]
    plain = "you are a worthless idiot"
    if family == "t5":
        assert (reloaded.pad_token_id, reloaded.eos_token_id, reloaded.unk_token_id) == (0, 1, 2)
        assert ids[-1] == 1 and ids.count(1) == 1
        assert reloaded.model_max_length == 512
        assert reloaded.decode(reloaded(plain)["input_ids"], skip_special_tokens=True) == plain
        pair = reloaded("a b", "c d")["input_ids"]
        assert pair.count(1) == 2 and pair[-1] == 1
    elif family == "roberta":
        specials = (reloaded.bos_token_id, reloaded.pad_token_id, reloaded.eos_token_id, reloaded.unk_token_id)
        assert specials == (0, 1, 2, 3)
        assert reloaded.convert_tokens_to_ids("<mask>") == 4 and reloaded.mask_token == "<mask>"
        assert ids[0] == 0 and ids[-1] == 2
        pair = reloaded("a b", "c d")["input_ids"]
        assert pair[0] == 0 and pair[-1] == 2 and pair.count(2) == 3
        assert reloaded.decode(ids, skip_special_tokens=True) == SAMPLES[1]
        assert reloaded.decode(reloaded(SAMPLES[3])["input_ids"], skip_special_tokens=True) == SAMPLES[3]
    elif family == "gpt2":
        assert reloaded.pad_token is None and reloaded.pad_token_id is None
        assert reloaded.bos_token == reloaded.eos_token == "<|endoftext|>"
        assert reloaded.eos_token_id == len(reloaded) - 1
        assert ids == reloaded(SAMPLES[1], add_special_tokens=False)["input_ids"]
        assert reloaded.eos_token_id not in ids
        assert reloaded.decode(ids) == SAMPLES[1]
        assert reloaded.decode(reloaded(SAMPLES[3])["input_ids"]) == SAMPLES[3]  # byte-level: lossless
    else:
        specials = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
        assert [reloaded.convert_tokens_to_ids(t) for t in specials] == [0, 1, 2, 3, 4]
        assert reloaded.pad_token_id == 0
        assert ids[0] == reloaded.cls_token_id and ids[-1] == reloaded.sep_token_id
        assert reloaded.decode(reloaded(plain)["input_ids"], skip_special_tokens=True) == plain


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_training_is_deterministic(family, corpus):
    a = toks.train_tokenizer(corpus, family, vocab_size=500)
    b = toks.train_tokenizer(list(corpus), family, vocab_size=500)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


# Trains with the `tokenizers` library's own trainers, set up like train/local_tokenizers.py (same normalisers,
# pre-tokenisers, special tokens, alphabets, min_frequency): WordPiece on the judge's sentences, T5-style BPE on the
# demo policy's corpus. Prints the WordPiece vocabulary's sha256 and the BPE vocabulary and merges.
_LIBRARY_TRAINERS = r"""
import hashlib, json, string
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from detoxrl.train.shipped_data import PROMPT_TEMPLATE, dialogue_rows, judge_rows, toxicity_rows

ascii_ = string.ascii_letters + string.digits + string.punctuation
wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
wp.normalizer = normalizers.BertNormalizer(lowercase=True)
wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
wp.train_from_iterator([r["text"] for r in judge_rows()], trainers.WordPieceTrainer(
    vocab_size=600, min_frequency=2, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    initial_alphabet=list(ascii_.lower()), show_progress=False))
wp_vocab = json.loads(wp.to_str())["model"]["vocab"]

rows, tox = dialogue_rows(), toxicity_rows()
corpus = ([PROMPT_TEMPLATE.format(dialogue=r["dialogue"]) for r in rows] + [r["summary"] for r in rows]
          + [r["text"] for r in tox])
bpe = Tokenizer(models.BPE(unk_token="<unk>"))
bpe.normalizer = normalizers.Sequence(
    [normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
bpe.train_from_iterator(corpus, trainers.BpeTrainer(
    vocab_size=800, min_frequency=2, special_tokens=["<pad>", "</s>", "<unk>"],
    initial_alphabet=list(ascii_) + ["\u2581"], show_progress=False))
model = json.loads(bpe.to_str())["model"]
print(json.dumps({"wordpiece": hashlib.sha256(json.dumps(sorted(wp_vocab.items())).encode()).hexdigest(),
                  "bpe_vocab": model["vocab"], "bpe_merges": [list(m) for m in model["merges"]]}))
"""


@pytest.fixture(scope="module")
def library_trainers() -> list[dict]:
    """The library trainers' outputs in four processes (PYTHONHASHSEED 1..4; they import tokenizers, not torch)."""
    import os
    import subprocess
    import sys

    outs = []
    for seed in range(1, 5):
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        res = subprocess.run([sys.executable, "-c", _LIBRARY_TRAINERS], env=env, capture_output=True, text=True,
                             check=True, timeout=120)
        outs.append(json.loads(res.stdout))
    return outs


def test_library_wordpiece_trainer_is_not_deterministic(library_trainers):
    """Why local_tokenizers.py trains WordPiece by hand: the library's trainer gives another vocabulary in another
    process, for the same texts and settings."""
    hashes = {o["wordpiece"] for o in library_trainers}
    assert len(hashes) > 1, ("tokenizers' WordPieceTrainer gave the same vocabulary in 4 processes: it may have "
                             "become deterministic; see train/local_tokenizers.py's docstring before switching to it")


def test_library_bpe_trainer_differs_from_ours(library_trainers):
    """Why local_tokenizers.py keeps its BPE trainer too: the library's is deterministic across processes but learns
    other merges than ours, so switching would change the demo's models and every shipped figure."""
    first = library_trainers[0]
    assert all(o["bpe_vocab"] == first["bpe_vocab"] and o["bpe_merges"] == first["bpe_merges"]
               for o in library_trainers)
    rows, tox = shipped.dialogue_rows(), shipped.toxicity_rows()
    corpus = ([shipped.PROMPT_TEMPLATE.format(dialogue=r["dialogue"]) for r in rows] + [r["summary"] for r in rows]
              + [r["text"] for r in tox])
    ours = json.loads(toks.train_tokenizer(corpus, "t5", 800).backend_tokenizer.to_str())["model"]
    assert len(ours["vocab"]) == len(first["bpe_vocab"]) == 800
    assert ours["vocab"] != first["bpe_vocab"] and [list(m) for m in ours["merges"]] != first["bpe_merges"]


def test_train_tokenizer_rejects_unknown_family(corpus):
    with pytest.raises(ValueError):
        toks.train_tokenizer(corpus, "llama")


# --------------------------------------------------------------------------- models
def test_build_t5_is_deterministic(corpus, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    tok = toks.train_tokenizer(corpus, "t5", vocab_size=400)
    p1 = builders.build_t5(tmp_path / "a", tok, seed=3)
    p2 = builders.build_t5(tmp_path / "b", tok, seed=3)
    p3 = builders.build_t5(tmp_path / "c", tok, seed=4)
    sd1, sd2, sd3 = (load_file(str(p / "model.safetensors")) for p in (p1, p2, p3))
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert any(not torch.equal(sd1[k], sd3[k]) for k in sd1)
    cfg = AutoConfig.from_pretrained(str(p1))
    assert cfg.model_type == "t5" and cfg.vocab_size == len(tok)
    assert (cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id) == (0, 0, 1)
    gen_cfg = json.loads((p1 / "generation_config.json").read_text())
    assert gen_cfg["decoder_start_token_id"] == 0 and gen_cfg["eos_token_id"] == 1


def test_builders_leave_caller_rng_alone(corpus, tmp_path):
    tok = toks.train_tokenizer(corpus, "t5", vocab_size=400)
    torch.manual_seed(123)
    random.seed(123)
    expected_t, expected_r = torch.rand(3), random.random()
    torch.manual_seed(123)
    random.seed(123)
    builders.build_t5(tmp_path / "t5", tok, seed=0)
    assert torch.equal(torch.rand(3), expected_t) and random.random() == expected_r


def test_test_models_load(tiny_hub):
    import datasets
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    expected = {"t5", "gpt2", "roberta_hate", "roberta_cola", "roberta_sentiment", "distilbert_imdb",
                "bert_toxic", "roberta_toxicity", "dialogsum", "imdb", "t5_sft_adapter"}
    assert set(tiny_hub) == expected
    assert all(Path(p).is_dir() for p in tiny_hub.values())

    tok = AutoTokenizer.from_pretrained(str(tiny_hub["t5"]))
    t5 = AutoModelForSeq2SeqLM.from_pretrained(str(tiny_hub["t5"])).eval()
    assert t5.config.model_type == "t5" and t5.config.vocab_size == len(tok)
    enc = tok(SAMPLES[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = t5.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2 and out[0, 0].item() == 0  # decoder starts with pad

    tok = AutoTokenizer.from_pretrained(str(tiny_hub["gpt2"]))
    gpt2 = AutoModelForCausalLM.from_pretrained(str(tiny_hub["gpt2"])).eval()
    assert gpt2.config.model_type == "gpt2" and tok.pad_token is None
    assert gpt2.config.eos_token_id == tok.eos_token_id
    enc = tok("I loved this movie", return_tensors="pt")
    with torch.no_grad():
        out = gpt2.generate(**enc, max_new_tokens=5, do_sample=True, top_k=0, top_p=1.0,
                            pad_token_id=tok.eos_token_id)
    assert out.shape[1] > enc["input_ids"].shape[1]

    labels = {
        "roberta_hate": ("roberta", {0: "nothate", 1: "hate"}),
        "roberta_cola": ("roberta", {0: "LABEL_0", 1: "LABEL_1"}),
        "roberta_sentiment": ("roberta", {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}),
        "distilbert_imdb": ("distilbert", {0: "NEGATIVE", 1: "POSITIVE"}),
        "bert_toxic": ("distilbert", dict(enumerate(["toxic", "severe_toxic", "obscene", "threat", "insult",
                                                     "identity_hate"]))),
        "roberta_toxicity": ("roberta", {0: "neutral", 1: "toxic"}),
    }
    for key, (model_type, id2label) in labels.items():
        tok = AutoTokenizer.from_pretrained(str(tiny_hub[key]))
        model = AutoModelForSequenceClassification.from_pretrained(str(tiny_hub[key])).eval()
        assert model.config.model_type == model_type
        assert model.config.id2label == id2label
        assert model.config.label2id == {v: k for k, v in id2label.items()}
        assert (model.config.problem_type == "multi_label_classification") == (key == "bert_toxic")
        # the longest input the tokenizer lets through must fit the position embeddings
        long_text = " ".join(["great movie and a stupid idiot"] * 200)
        enc = tok([long_text, "short"], padding=True, truncation=True, return_tensors="pt")
        assert enc["input_ids"].shape[1] == tok.model_max_length
        with torch.no_grad():
            logits = model(**enc).logits
        assert logits.shape == (2, len(id2label)) and torch.isfinite(logits).all()

    dsd = datasets.load_from_disk(str(tiny_hub["dialogsum"]))
    assert set(dsd) == {"train", "validation", "test"}
    for split in dsd.values():
        assert set(split.column_names) == {"id", "dialogue", "summary", "topic"} and len(split) > 0
    all_ids = [i for s in dsd.values() for i in s["id"]]
    assert len(all_ids) == len(set(all_ids))

    imdb_dir = Path(tiny_hub["imdb"])
    imdb = datasets.load_dataset(
        "parquet", data_files={"train": str(imdb_dir / "train.parquet"), "test": str(imdb_dir / "test.parquet")}
    )
    assert set(imdb) == {"train", "test"}
    for split in imdb.values():
        assert set(split.column_names) == {"text", "label"}
        assert set(split["label"]) == {0, 1}
    texts = list(imdb["train"]["text"]) + list(imdb["test"]["text"])
    assert 80 <= len(texts) <= 120 and len(set(texts)) == len(texts)
    assert any(len(t) > 200 for t in texts) and any(len(t) < 200 for t in texts)
    assert set(datasets.load_dataset(str(imdb_dir))) == {"train", "test"}


def test_sft_adapter_changes_logits(tiny_hub):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    cfg = PeftConfig.from_pretrained(str(tiny_hub["t5_sft_adapter"]))
    assert cfg.r == 8 and cfg.lora_alpha == 8 and cfg.lora_dropout == pytest.approx(0.05)
    assert set(cfg.target_modules) == {"q", "v"} and str(cfg.task_type).endswith("SEQ_2_SEQ_LM")

    tok = AutoTokenizer.from_pretrained(str(tiny_hub["t5"]))
    enc = tok(SAMPLES[:2], padding=True, return_tensors="pt")
    dec = torch.zeros((2, 3), dtype=torch.long)
    base = AutoModelForSeq2SeqLM.from_pretrained(str(tiny_hub["t5"])).eval()
    with torch.no_grad():
        before = base(**enc, decoder_input_ids=dec).logits
    peft_model = PeftModel.from_pretrained(base, str(tiny_hub["t5_sft_adapter"])).eval()
    with torch.no_grad():
        after = peft_model(**enc, decoder_input_ids=dec).logits
    assert before.shape == after.shape
    assert (before - after).abs().max().item() > 1e-4


def test_training_helpers_run_and_save(corpus, tmp_path):
    from safetensors.torch import load_file

    tok = toks.train_tokenizer(corpus, "roberta", vocab_size=400, model_max_length=62)
    clf = builders.build_classifier(tmp_path / "clf", tok, "roberta", {0: "nothate", 1: "hate"}, hidden=16,
                              max_position=64)
    before = load_file(str(clf / "model.safetensors"))
    texts = ["you are a stupid idiot", "thanks for the lunch", "shut up, loser", "see you on Monday"] * 4
    res = finetune.train_classifier(clf, texts, [1, 0, 1, 0] * 4, epochs=2, lr=1e-3)
    assert 0.0 <= res["train_accuracy"] <= 1.0
    after = load_file(str(clf / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)

    tok5 = toks.train_tokenizer(corpus, "t5", vocab_size=400)
    t5 = builders.build_t5(tmp_path / "t5", tok5, d_model=32, d_ff=64)
    res = finetune.sft_seq2seq(t5, ["summarize: a b c", "summarize: d e"], ["a b", "d"], steps=3, batch_size=2)
    assert res["final_loss"] == res["final_loss"] and res["final_loss"] > 0  # finite, not NaN

    tokg = toks.train_tokenizer(corpus, "gpt2", vocab_size=400)
    g = builders.build_gpt2(tmp_path / "gpt2", tokg, n_embd=32, n_positions=64)
    res = finetune.sft_causal(g, ["I loved this movie.", "What a boring film."], steps=3, batch_size=2)
    assert res["final_loss"] == res["final_loss"] and res["final_loss"] > 0


# --------------------------------------------------------------------------- demo cache
def _fake_builder(calls: list):
    def build(out: Path, hp: dict) -> dict:
        calls.append(out)
        for name in ("policy", "reward", "data"):
            (out / name).mkdir(parents=True)
        return {"fake": True}

    return build


def test_demo_cache_logic(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(demo, "_build_demo_into", _fake_builder(calls))
    cache = tmp_path / "detoxrl-cache"  # the autouse fixture's DETOXRL_CACHE
    paths = demo.build_demo_assets()
    assert set(paths) == {"policy", "reward", "data"}
    root = paths["policy"].parent
    assert root.parent == cache and root.name.startswith("demo-")
    assert len(calls) == 1 and calls[0] != root  # built elsewhere, then renamed
    assert demo.build_demo_assets() == paths and len(calls) == 1  # cache hit
    assert demo.build_demo_assets(force=True) == paths and len(calls) == 2
    assert json.loads((root / "manifest.json").read_text())["metrics"] == {"fake": True}
    # an explicit cache_dir wins over the environment variable
    other = demo.build_demo_assets(cache_dir=tmp_path / "elsewhere")
    assert other["policy"].parent.parent == tmp_path / "elsewhere" and len(calls) == 3
    # other hyperparameters -> another cache entry
    monkeypatch.setitem(demo.DEMO_HPARAMS, "seed", 1)
    assert demo.build_demo_assets()["policy"].parent != root and len(calls) == 4
    assert not [p for p in cache.iterdir() if p.name.endswith((".tmp", ".old"))]  # no leftovers of the swaps


def test_demo_cache_survives_a_crash(tmp_path, monkeypatch):
    def boom(out: Path, hp: dict) -> dict:
        (out / "policy").mkdir(parents=True)
        raise RuntimeError("crash in the middle of a build")

    monkeypatch.setattr(demo, "_build_demo_into", boom)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError):
        demo.build_demo_assets(cache_dir=cache)
    assert not [p for p in cache.iterdir() if p.is_dir()]  # nothing half-built is left to trust
    calls: list = []
    monkeypatch.setattr(demo, "_build_demo_into", _fake_builder(calls))
    demo.build_demo_assets(cache_dir=cache)
    assert len(calls) == 1


# --------------------------------------------------------------------------- real demo build
def test_build_demo_assets(demo_assets):
    """The session's demo build (the same call as `make demo`'s; built from scratch on a fresh machine, cache hits
    are tested above): a classifier that separates the labels, the data splits, a T5 that writes summaries."""
    import datasets
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoTokenizer

    paths = demo_assets
    manifest = json.loads((paths["policy"].parent / "manifest.json").read_text())
    assert manifest["metrics"]["reward_train_accuracy"] >= 0.9

    rtok = AutoTokenizer.from_pretrained(str(paths["reward"]))
    reward = AutoModelForSequenceClassification.from_pretrained(str(paths["reward"])).eval()
    assert reward.config.id2label == {0: "nothate", 1: "hate"}
    enc = rtok(["you are a stupid worthless idiot", "#Person1# thanks #Person2# for the lunch."],
               padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        p_hate = reward(**enc).logits.softmax(-1)[:, 1]
    assert p_hate[0] > 0.5 > p_hate[1]

    data = datasets.load_dataset("json", data_files={"train": str(paths["data"] / "train.jsonl"),
                                                     "test": str(paths["data"] / "test.jsonl")})
    assert set(data["train"].column_names) == {"id", "dialogue", "summary", "topic"}
    assert len(data["train"]) > len(data["test"]) > 0

    ptok = AutoTokenizer.from_pretrained(str(paths["policy"]))
    policy = AutoModelForSeq2SeqLM.from_pretrained(str(paths["policy"])).eval()
    prompts = [shipped.PROMPT_TEMPLATE.format(dialogue=d) for d in data["test"]["dialogue"][:8]]
    enc = ptok(prompts, padding=True, return_tensors="pt")
    torch.manual_seed(0)
    with torch.no_grad():
        out = policy.generate(**enc, max_new_tokens=40, do_sample=True, top_k=0, top_p=1.0)
    texts = ptok.batch_decode(out, skip_special_tokens=True)
    assert all(t.strip() for t in texts)
    assert sum("#Person" in t for t in texts) >= len(texts) // 2  # summary-like
