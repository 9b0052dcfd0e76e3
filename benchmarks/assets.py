"""Models and prompt sets for the benchmarks: real architectures at real sizes with random weights, no download.

Each model is built from a transformers config (the published sizes of flan-t5-base/large/xl/xxl, GPT-2 small,
RoBERTa-base), with a tokenizer trained locally on the shipped demo texts. A tokenizer trained on so little text
has only ~1.5k entries; to give a model its real vocabulary size (the lm-head and embedding cost scale with it) the
tokenizer is padded with filler words `x<id>` up to that size, so every id the model samples decodes to text that
the reward classifier re-tokenizes. CPU runs may use the small vocabulary instead (`vocab=None`).

Everything is cached under `$DETOXRL_CACHE/bench` (default ~/.cache/detoxrl/bench), keyed by the spec, and built
once: a random flan-t5-xxl is 22 GB in bfloat16, so large models are created in bfloat16 directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from detoxrl.train.atomic import atomic_directory
from detoxrl.train.local_tokenizers import train_tokenizer
from detoxrl.train.shipped_data import DEMO_DATA_DIR, load_jsonl
from detoxrl.train.stand_in_models import make_imdb_rows
from detoxrl.train.tiny_builders import build_classifier, build_gpt2
from detoxrl.train.tiny_finetune import sft_causal, train_classifier

CORPUS_VOCAB = 2000  # BPE merges on the demo texts (it stops earlier: the corpus is small)

# Published sizes (d_kv is 64 in every flan-t5; vocab 32128). "tiny" is the test suite's scale.
T5_SIZES = {
    "tiny": dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16),
    "base": dict(d_model=768, d_ff=2048, num_layers=12, num_heads=12, d_kv=64),
    "large": dict(d_model=1024, d_ff=2816, num_layers=24, num_heads=16, d_kv=64),
    "xl": dict(d_model=2048, d_ff=5120, num_layers=24, num_heads=32, d_kv=64),
    "xxl": dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64),
}
GPT2_SIZES = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=4),
    "small": dict(n_embd=768, n_layer=12, n_head=12),      # gpt2 / lvwerra/gpt2-imdb (124M)
    "half": dict(n_embd=768, n_layer=6, n_head=12),        # distilbert-imdb-sized reward on the GPT-2 tokenizer
}
ROBERTA_SIZES = {
    "tiny": dict(hidden=32, layers=2, heads=4),
    "base": dict(hidden=768, layers=12, heads=12),         # facebook/roberta-hate-speech-dynabench-r4-target
}
REAL_VOCAB = {"t5": 32128, "gpt2": 50257, "roberta": 50265}


def cache_root() -> Path:
    env = os.environ.get("DETOXRL_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "detoxrl") / "bench"


@dataclass(frozen=True)
class ModelSet:
    """What one benchmark configuration trains with: policy, reward classifier, prompt data (all local folders)."""
    kind: str            # seq2seq | causal
    policy_size: str     # key of T5_SIZES / GPT2_SIZES
    reward_size: str     # key of ROBERTA_SIZES (seq2seq) / GPT2_SIZES (causal: a GPT-2 classifier, 1 logit)
    vocab: Optional[int]  # model vocabulary (None: the small trained tokenizer's size)
    prompt_chars: int    # each prompt text is at least this long (so truncation gives a fixed token count)
    rows: int = 512
    dtype: str = "float32"  # saved weights dtype (bfloat16 for the multi-billion memory-study models)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def _corpus() -> list[str]:
    rows = load_jsonl(DEMO_DATA_DIR / "dialogues.jsonl")
    tox = load_jsonl(DEMO_DATA_DIR / "toxicity.jsonl")
    return [r["dialogue"] for r in rows] + [r["summary"] for r in rows] + [r["text"] for r in tox]


def make_tokenizer(family: str, vocab: Optional[int], extra_pad: bool = False):
    """A locally trained tokenizer of the family's conventions, padded with filler words up to `vocab` entries.

    `extra_pad`: give GPT-2 a `<pad>` distinct from EOS (TRL's PPO treats every pad id in a response as padding;
    with pad == EOS a sampled EOS would end TRL's sample but not ours)."""
    tok = train_tokenizer(_corpus(), family, CORPUS_VOCAB)
    if extra_pad:
        tok.add_special_tokens({"pad_token": "<pad>"})
    if vocab is not None and vocab > len(tok):
        tok.add_tokens([f"x{i}" for i in range(len(tok), vocab)])
    return tok


def _save_tokenizer(tok, folder: Path, max_length: int) -> None:
    tok.model_max_length = max_length
    tok.save_pretrained(str(folder))
    cfg_path = folder / "tokenizer_config.json"  # transformers 5 writes a class name transformers 4 cannot load
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _init_dtype(dtype: str):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def build_t5_policy(folder: Path, tok, size: str, dtype: str = "float32", seed: int = 0) -> None:
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    s = T5_SIZES[size]
    config = T5Config(vocab_size=len(tok), d_model=s["d_model"], d_kv=s["d_kv"], d_ff=s["d_ff"],
                      num_layers=s["num_layers"], num_decoder_layers=s["num_layers"], num_heads=s["num_heads"],
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id,
                      # small init: an untrained T5 at factor 1.0 samples one token only (docs/ARCHITECTURE.md); fine
                      # way for timing, but diverse samples exercise the reward tokenizer realistically
                      initializer_factor=0.05 if size == "tiny" else 1.0)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(_init_dtype(dtype))  # xl/xxl: never materialise float32 copies
    try:
        model = T5ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config = GenerationConfig(decoder_start_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(str(folder))
    _save_tokenizer(tok, folder, 512)


def build_gpt2_lm(folder: Path, tok, size: str, n_positions: int = 1024, seed: int = 0) -> None:
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tok), n_positions=n_positions, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, **GPT2_SIZES[size])
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(str(folder))
    _save_tokenizer(tok, folder, n_positions)


def build_gpt2_classifier(folder: Path, tok, size: str, n_positions: int = 1024, seed: int = 1,
                          num_labels: int = 1) -> None:
    """GPT2ForSequenceClassification: what TRL's PPO needs (shares the policy tokenizer, `score` head, 1 logit)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
    config = GPT2Config(vocab_size=len(tok), n_positions=n_positions, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, summary_first_dropout=0.0, bos_token_id=tok.eos_token_id,
                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, num_labels=num_labels,
                        id2label=id2label, label2id={v: k for k, v in id2label.items()}, **GPT2_SIZES[size])
    torch.manual_seed(seed)
    GPT2ForSequenceClassification(config).save_pretrained(str(folder))
    _save_tokenizer(tok, folder, n_positions)


def build_roberta_classifier(folder: Path, size: str, vocab: Optional[int], seed: int = 1) -> None:
    s = ROBERTA_SIZES[size]
    tok = make_tokenizer("roberta", vocab)
    build_classifier(folder, tok, "roberta", {0: "nothate", 1: "hate"}, hidden=s["hidden"], layers=s["layers"],
                     heads=s["heads"], max_position=514, seed=seed, dropout=0.0)


def _long_texts(n: int, min_chars: int, field: str) -> list[dict]:
    """`n` rows whose `field` is a run of demo dialogues at least `min_chars` long (rotating start)."""
    dialogues = [r["dialogue"] for r in load_jsonl(DEMO_DATA_DIR / "dialogues.jsonl")]
    out = []
    for i in range(n):
        parts, j = [], i
        while sum(len(p) + 1 for p in parts) < min_chars:
            parts.append(dialogues[j % len(dialogues)])
            j += 7
        out.append({field: "\n".join(parts), "summary": "A conversation."})
    return out


def _write_rows(folder: Path, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        with open(folder / f"{split}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


def build_model_set(spec: ModelSet, root: Optional[Path] = None) -> dict[str, Path]:
    """Build (once; cached by the spec) the policy, reward and data folders of a configuration."""
    root = (root or cache_root()) / f"{spec.kind}-{spec.policy_size}-{spec.key()}"
    paths = {"policy": root / "policy", "reward": root / "reward", "data": root / "data"}
    if (root / "spec.json").is_file():
        return paths
    with atomic_directory(root) as tmp:
        if spec.kind == "seq2seq":
            tok = make_tokenizer("t5", spec.vocab)
            build_t5_policy(tmp / "policy", tok, spec.policy_size, spec.dtype)
            build_roberta_classifier(tmp / "reward", spec.reward_size,
                                     REAL_VOCAB["roberta"] if spec.vocab is not None else None)
            _write_rows(tmp / "data", _long_texts(spec.rows, spec.prompt_chars, "dialogue"))
        else:
            tok = make_tokenizer("gpt2", spec.vocab, extra_pad=True)
            build_gpt2_lm(tmp / "policy", tok, spec.policy_size)
            build_gpt2_classifier(tmp / "reward", tok, spec.reward_size)
            _write_rows(tmp / "data", _long_texts(spec.rows, spec.prompt_chars, "text"))
        (tmp / "spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return paths


# --------------------------------------------------------------------------------------------------------------
# The causal toy for the learning-curve comparison (ours vs TRL): both need a reward that shares GPT-2's tokenizer
# --------------------------------------------------------------------------------------------------------------
TOY_VERSION = "1"


def build_causal_toy(root: Optional[Path] = None) -> dict[str, Path]:
    """A tiny GPT-2 fine-tuned on toy movie reviews (half positive, half negative) and a tiny GPT-2 sentiment
    classifier on the SAME tokenizer with one logit (positive minus negative): PPO should raise it quickly.

    Returns folders `policy`, `reward` and `data` (train/test.jsonl with a `text` column)."""
    root = (root or cache_root()) / f"causal-toy-v{TOY_VERSION}"
    paths = {"policy": root / "policy", "reward": root / "reward", "data": root / "data"}
    if (root / "done").is_file():
        return paths
    rows = make_imdb_rows(400, seed=0)
    texts = [r["text"] for r in rows]
    tok = train_tokenizer(texts, "gpt2", 600)
    tok.add_special_tokens({"pad_token": "<pad>"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic builds
    with atomic_directory(root) as tmp:
        try:
            build_gpt2_lm(tmp / "policy", tok, "tiny", n_positions=128, seed=0)
            sft_causal(tmp / "policy", texts, steps=300, lr=3e-3, batch_size=16, seed=0, max_length=96)
            build_gpt2_classifier(tmp / "reward2", tok, "tiny", n_positions=128, seed=1, num_labels=2)
            train_classifier(tmp / "reward2", texts, [r["label"] for r in rows], epochs=8, lr=3e-3, batch_size=32)
            _one_logit(tmp / "reward2", tmp / "reward")
        finally:
            torch.set_num_threads(threads)
        shutil.rmtree(tmp / "reward2")
        _write_rows(tmp / "data", [{"text": t} for t in texts])
        (tmp / "done").write_text("ok\n")
    return paths


def _one_logit(two_label_dir: Path, out_dir: Path) -> None:
    """A 2-label GPT-2 classifier as a 1-logit one: score = logit(POSITIVE) - logit(NEGATIVE) (TRL reads logit 0)."""
    from transformers import AutoTokenizer, GPT2ForSequenceClassification

    two = GPT2ForSequenceClassification.from_pretrained(str(two_label_dir))
    cfg = two.config
    cfg.num_labels = 1
    cfg.problem_type = None  # training set single_label_classification, which needs 2 labels
    cfg.id2label, cfg.label2id = {0: "LABEL_0"}, {"LABEL_0": 0}
    one = GPT2ForSequenceClassification(cfg)
    state = two.state_dict()
    w = state.pop("score.weight")
    state["score.weight"] = (w[1] - w[0]).unsqueeze(0)
    one.load_state_dict(state)
    one.save_pretrained(str(out_dir))
    _save_tokenizer(AutoTokenizer.from_pretrained(str(two_label_dir)), out_dir, cfg.n_positions)


# --------------------------------------------------------------------------------------------------------------
# The learning benchmark's toys (benchmarks/learning.py): a classifier reward with its OWN tokenizer
# --------------------------------------------------------------------------------------------------------------
CAUSAL_DIALOGUE_TEMPLATE = "{dialogue}\nSummary:"  # tests/conftest.py `causal_demo` uses the same shape
CAUSAL_DIALOGUE_VERSION = "2"


def build_t5_detox_toy(root: Optional[Path] = None) -> dict[str, Path]:
    """The offline demo's assets: a tiny T5 summariser fine-tuned on the shipped dialogues (some of its summaries
    are rude) and the tiny RoBERTa `nothate`/`hate` classifier with its own tokenizer (train/demo_assets.py)."""
    from detoxrl.train.demo_assets import build_demo_assets

    return build_demo_assets(root)  # None: the trainer's own demo cache ($DETOXRL_CACHE)


def build_causal_dialogue_toy(root: Optional[Path] = None) -> dict[str, Path]:
    """A tiny GPT-2 fine-tuned to continue the shipped dialogues with their summaries; its reward is the demo's
    RoBERTa toxicity classifier (its own tokenizer), its data the demo's dialogues. Returns policy, reward, data."""
    demo = build_t5_detox_toy(root)
    folder = (root or cache_root()) / f"causal-dialogue-toy-v{CAUSAL_DIALOGUE_VERSION}"
    paths = {"policy": folder / "policy", "reward": demo["reward"], "data": demo["data"]}
    if (folder / "done").is_file():
        return paths
    rows = [r for r in load_jsonl(DEMO_DATA_DIR / "dialogues.jsonl") if r["split"] == "train"]
    texts = [CAUSAL_DIALOGUE_TEMPLATE.format(dialogue=r["dialogue"]) + " " + r["summary"] for r in rows]
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = train_tokenizer(texts, "gpt2", 800)
    tok.add_special_tokens({"pad_token": "<pad>"})  # TRL (0.11.4 and 1.12) pads with it; distinct from EOS
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic builds
    try:
        build_gpt2(tmp / "policy", tok, n_positions=256, seed=0, dropout=0.0)
        sft_causal(tmp / "policy", texts, steps=300, lr=3e-3, batch_size=16, seed=0, max_length=128)
    finally:
        torch.set_num_threads(threads)
    (tmp / "done").write_text("ok\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return paths


def transformers4_copy(folder: Path, dropout_off: bool = False) -> Path:
    """A copy of a model folder that transformers 4.x (TRL 0.11.4's 4.46.3) loads as the same function, or the
    folder itself when it already does. `dropout_off`: the copy's config also says dropout 0 (TRL 0.11.4 leaves the
    policy in train mode after each update, so the next rollout samples with the model's dropout; detoxrl never
    applies dropout).

    Why: transformers 5 always ties a T5's lm_head to its input embeddings and records the T5 v1.1 "do not scale
    the decoder output" as `scale_decoder_outputs: false` next to `tie_word_embeddings: true`. Transformers 4 knows
    only `tie_word_embeddings` and, when it is true, multiplies the decoder output by d_model**-0.5 before the
    lm_head: the demo T5 (d_model 64) would sample at an effective temperature of 8 (garbage). The copy says
    `tie_word_embeddings: false` and stores the lm_head weight explicitly (equal to the embeddings), which both
    versions read as "unscaled, this lm_head". Tokenizers need no change (tokenizer_class is already
    PreTrainedTokenizerFast, see `_save_tokenizer`)."""
    cfg = json.loads((folder / "config.json").read_text())
    untie = cfg.get("model_type") == "t5" and not cfg.get("scale_decoder_outputs", True) and cfg.get(
        "tie_word_embeddings")
    drop_keys = [k for k in ("dropout_rate", "resid_pdrop", "embd_pdrop", "attn_pdrop") if cfg.get(k)]
    if not untie and not (dropout_off and drop_keys):
        return folder
    out = folder.with_name(folder.name + "-transformers4" + ("-nodropout" if dropout_off else ""))
    if (out / "done").is_file():
        return out
    from safetensors.torch import load_file, save_file

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder, tmp)
    if untie:
        state = load_file(str(folder / "model.safetensors"))
        state["lm_head.weight"] = state["shared.weight"].clone()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg["tie_word_embeddings"] = False
        cfg.pop("scale_decoder_outputs", None)
    if dropout_off:
        cfg.update({k: 0.0 for k in drop_keys})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / "done").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
