"""Fine-tuning of the tiny models in place: supervised fine-tuning (seq2seq, causal) and classifier training.

Plain torch loops on the CPU (AdamW, warmup then linear decay, gradient clipping), deterministic for a seed; each
function loads the model folder, trains it and saves it back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from detoxrl.train.reproducible import rng_guarded, seed_all


def _batches(n: int, batch_size: int, gen: torch.Generator, steps: int | None = None) -> Iterator[list[int]]:
    """Shuffled mini-batches of indices; epoch after epoch (``steps`` batches) or one epoch."""
    done = 0
    while True:
        perm = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n, batch_size):
            yield perm[i : i + batch_size]
            done += 1
            if steps is not None and done >= steps:
                return
        if steps is None:
            return


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


@rng_guarded
def train_classifier(
    model_dir,
    texts: list[str],
    labels: list[int],
    epochs: int = 30,
    lr: float = 2e-3,
    batch_size: int = 32,
    seed: int = 0,
    max_length: int = 64,
) -> dict:
    """Fine-tune the classifier saved in ``model_dir`` in place (CPU, plain torch loop,
    deterministic for a given seed); returns ``{"train_accuracy", "final_loss"}``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if len(texts) != len(labels) or not texts:
        raise ValueError("texts and labels must be non-empty and of the same length")
    model_dir = Path(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    seed_all(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    enc = tok(list(texts), truncation=True, max_length=max_length)
    y = torch.tensor([int(v) for v in labels], dtype=torch.long)

    def collate(idx):
        return tok.pad({"input_ids": [enc["input_ids"][i] for i in idx],
                        "attention_mask": [enc["attention_mask"][i] for i in idx]}, return_tensors="pt")

    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(texts) + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, max(1, total // 10)))
    model.train()
    losses = []
    for idx in _batches(len(texts), batch_size, gen, steps=total):
        batch = collate(idx)
        out = model(**batch, labels=y[idx])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(texts), 128):
            idx = list(range(i, min(i + 128, len(texts))))
            pred = model(**collate(idx)).logits.argmax(-1)
            correct += int((pred == y[idx]).sum())
    model.save_pretrained(str(model_dir))
    tail = losses[-steps_per_epoch:]
    return {"train_accuracy": correct / len(texts), "final_loss": sum(tail) / len(tail), "steps": total}


def _fine_tune(model, model_dir: Path, n_examples: int, collate, steps: int, lr: float, batch_size: int,
               seed: int) -> dict:
    """The SFT loop shared by the seq2seq and causal builders: AdamW, warmup + decay, clipping; saves in place."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, max(1, steps // 20)))
    model.train()
    losses = []
    for idx in _batches(n_examples, batch_size, gen, steps=steps):
        ids, mask, lab = collate(idx)
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    model.save_pretrained(str(model_dir))
    tail = losses[-max(1, min(20, len(losses))):]
    return {"final_loss": sum(tail) / len(tail), "steps": steps}


@rng_guarded
def sft_seq2seq(
    model_dir,
    sources: list[str],
    targets: list[str],
    steps: int = 600,
    lr: float = 3e-3,
    batch_size: int = 16,
    seed: int = 0,
    max_source_length: int = 256,
    max_target_length: int = 64,
) -> dict:
    """Supervised fine-tuning of the seq2seq model in ``model_dir`` in place (teacher
    forcing, cross-entropy on the targets); returns ``{"final_loss"}``."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    if len(sources) != len(targets) or not sources:
        raise ValueError("sources and targets must be non-empty and of the same length")
    model_dir = Path(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    seed_all(seed)
    model = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir))
    src = tok(list(sources), truncation=True, max_length=max_source_length)["input_ids"]
    tgt = tok(list(targets), truncation=True, max_length=max_target_length)["input_ids"]
    pad = tok.pad_token_id

    def collate(idx):
        s = [src[i] for i in idx]
        t = [tgt[i] for i in idx]
        ls, lt = max(map(len, s)), max(map(len, t))
        ids = torch.full((len(idx), ls), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), ls), dtype=torch.long)
        lab = torch.full((len(idx), lt), -100, dtype=torch.long)
        for k, (a, b) in enumerate(zip(s, t)):
            ids[k, : len(a)] = torch.tensor(a)
            mask[k, : len(a)] = 1
            lab[k, : len(b)] = torch.tensor(b)
        return ids, mask, lab

    return _fine_tune(model, model_dir, len(sources), collate, steps, lr, batch_size, seed)


@rng_guarded
def sft_causal(
    model_dir,
    texts: list[str],
    steps: int = 300,
    lr: float = 3e-3,
    batch_size: int = 16,
    seed: int = 0,
    max_length: int = 128,
) -> dict:
    """Language-model fine-tuning of the causal LM in ``model_dir`` in place (each text
    followed by eos); returns ``{"final_loss"}``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not texts:
        raise ValueError("texts must be non-empty")
    model_dir = Path(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    seed_all(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    eos = tok.eos_token_id
    ids_all = [x[: max_length - 1] + [eos] for x in tok(list(texts))["input_ids"]]

    def collate(idx):
        seqs = [ids_all[i] for i in idx]
        n = max(map(len, seqs))
        ids = torch.full((len(idx), n), eos, dtype=torch.long)
        mask = torch.zeros((len(idx), n), dtype=torch.long)
        lab = torch.full((len(idx), n), -100, dtype=torch.long)
        for k, s in enumerate(seqs):
            ids[k, : len(s)] = torch.tensor(s)
            mask[k, : len(s)] = 1
            lab[k, : len(s)] = torch.tensor(s)
        return ids, mask, lab

    return _fine_tune(model, model_dir, len(ids_all), collate, steps, lr, batch_size, seed)

