"""Tiny, randomly initialised models built from configs and saved as hub-like folders with their tokenizer.

T5 (flan-t5 style), GPT-2 and the two classifier families (RoBERTa, DistilBERT); each is seeded, leaves the caller's
RNG states alone and is bitwise reproducible for a seed.  Training them is train/tiny_finetune.py's job.
"""
from __future__ import annotations

from pathlib import Path

from detoxrl.train.local_tokenizers import save_tokenizer
from detoxrl.train.reproducible import rng_guarded, seed_all


@rng_guarded
def build_t5(
    save_dir,
    tokenizer,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    d_ff: int = 128,
    seed: int = 0,
    dropout: float = 0.1,
    initializer_factor: float = 1.0,
) -> Path:
    """A randomly initialised tiny T5ForConditionalGeneration (flan-t5 style: gated-gelu,
    untied lm_head, relative attention), saved with its tokenizer and generation config.

    With T5's default init (factor 1.0) an untrained tiny T5 puts all its mass on one token (it samples only
    <pad>); untrained test models use a small factor so their samples are diverse."""
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 1
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
        num_layers=num_layers, num_decoder_layers=num_layers, num_heads=num_heads,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=dropout, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        is_encoder_decoder=True, pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=pad_id,
        initializer_factor=initializer_factor,
    )
    seed_all(seed)
    model = T5ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=pad_id, eos_token_id=eos_id, pad_token_id=pad_id
    )
    model.save_pretrained(str(save_dir))
    save_tokenizer(tokenizer, save_dir)
    return save_dir


@rng_guarded
def build_gpt2(
    save_dir,
    tokenizer,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_positions: int = 256,
    seed: int = 0,
    dropout: float = 0.1,
) -> Path:
    """A randomly initialised tiny GPT2LMHeadModel saved with its tokenizer."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    eos_id = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=eos_id, eos_token_id=eos_id,
    )
    seed_all(seed)
    model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id)
    model.save_pretrained(str(save_dir))
    save_tokenizer(tokenizer, save_dir, model_max_length=n_positions)
    return save_dir


@rng_guarded
def build_classifier(
    save_dir,
    tokenizer,
    family: str,
    id2label: dict[int, str],
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    max_position: int = 130,
    seed: int = 0,
    dropout: float = 0.1,
    problem_type: str | None = None,
) -> Path:
    """A randomly initialised tiny sequence classifier (``"roberta"`` or ``"distilbert"``)
    with ``config.id2label``/``label2id`` set, saved with its tokenizer (whose
    model_max_length is capped to what the position embeddings allow). ``problem_type``
    ``"multi_label_classification"`` marks independent sigmoid labels (as unitary/toxic-bert)."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    id2label = {int(k): str(v) for k, v in id2label.items()}
    label2id = {v: k for k, v in id2label.items()}
    if family == "roberta":
        from transformers import RobertaConfig, RobertaForSequenceClassification

        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 1
        # RoBERTa position ids start at pad_id + 1
        max_len = max_position - pad_id - 1
        if max_len < 1:
            raise ValueError(f"max_position={max_position} too small for pad id {pad_id}")
        config = RobertaConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=4 * hidden, max_position_embeddings=max_position, type_vocab_size=1,
            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
            pad_token_id=pad_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            id2label=id2label, label2id=label2id,
        )
        cls = RobertaForSequenceClassification
    elif family == "distilbert":
        from transformers import DistilBertConfig, DistilBertForSequenceClassification

        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        max_len = max_position
        config = DistilBertConfig(
            vocab_size=len(tokenizer), dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=4 * hidden,
            max_position_embeddings=max_position, dropout=dropout, attention_dropout=dropout,
            seq_classif_dropout=dropout, pad_token_id=pad_id, id2label=id2label, label2id=label2id,
        )
        cls = DistilBertForSequenceClassification
    else:
        raise ValueError(f"unknown classifier family {family!r}; expected 'roberta' or 'distilbert'")
    if problem_type is not None:
        config.problem_type = problem_type
    seed_all(seed)
    model = cls(config)
    model.save_pretrained(str(save_dir))
    save_tokenizer(tokenizer, save_dir, model_max_length=max_len)
    return save_dir

