"""Peer: TRL 0.11.4's PPO (the seeds' own library), run the way the seeds ran it, on a learning-benchmark toy.

Runs INSIDE its own virtualenv (benchmarks/trl_env.py `TRL_0_11`); imports nothing from this repository and reads
one JSON spec written by benchmarks/learning.py or benchmarks/ppo_throughput.py:

    <trl011-venv>/bin/python benchmarks/trl011_baseline.py SPEC.json

spec keys: kind (seq2seq|causal), policy, reward (model folders), reward_label, prompts (token-id lists), steps,
seed, lr, batch_size, mini_batch_size, ppo_epochs, kl {init_coef, adaptive, target, horizon}, lora {r, alpha,
dropout, target_modules}, generation {min_new_tokens, max_new_tokens, top_k, top_p, temperature, mode}, threads,
out.

generation.mode: `batched` (default: the whole batch in one `trainer.generate(queries, batch_size=B)` call, TRL's
batched generate) or `loop`: the notebook's own loop, one `generate` per prompt with `max_new_tokens` drawn from
TRL's `LengthSampler(min_new_tokens, max_new_tokens + 1)` for each prompt (the notebook:
`summary = ppo_trainer.generate(prompt_tensor, **generation_kwargs); summary.squeeze()[-max_new_tokens:]`).

The seeds' loop (their notebook): `AutoModelForSeq2SeqLMWithValueHead` (a value head on the policy's own decoder
states), a LoRA policy, `PPOConfig(learning_rate, ppo_epochs, mini_batch_size, batch_size)` with TRL's adaptive KL
(init 0.2, target 6, horizon 10000) and its other defaults (gamma 1, lam 0.95, clip 0.2, value clip 0.2, vf_coef
0.1, no reward scaling), sampling with top_k 0 / top_p 1, the classifier's `nothate` logit as the score, then
`ppo_trainer.step(queries, responses, scores)`. Here the LoRA is given as `peft_config` (TRL's own path: the
reference is the policy with the adapter disabled, i.e. the start) and the batch is generated in one call.

Writes {"steps": [{"responses", "kl", "kl_coef", "logged_reward", "seconds", "generate_seconds"}], "versions",
"peak_rss_mb", "trainable_parameters"} to spec["out"]; `kl` is TRL's `objective/kl` (sum over response tokens of
log pi - log pi_ref, mean over the batch).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path


def run(spec: dict) -> dict:
    import torch

    torch.set_num_threads(int(spec["threads"]))
    import peft
    import transformers
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import (AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead, PPOConfig, PPOTrainer,
                     set_seed)
    from trl.core import LengthSampler

    seed, seq2seq = int(spec["seed"]), spec["kind"] == "seq2seq"
    set_seed(seed)
    tok = AutoTokenizer.from_pretrained(spec["policy"])
    lora, kl, gen = spec["lora"], spec["kl"], spec["generation"]
    peft_config = LoraConfig(r=int(lora["r"]), lora_alpha=int(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                             target_modules=list(lora["target_modules"]),
                             task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM")
    model_cls = AutoModelForSeq2SeqLMWithValueHead if seq2seq else AutoModelForCausalLMWithValueHead
    model = model_cls.from_pretrained(spec["policy"], peft_config=peft_config)
    B = int(spec["batch_size"])
    config = PPOConfig(model_name=spec["policy"], learning_rate=float(spec["lr"]), batch_size=B,
                       mini_batch_size=int(spec["mini_batch_size"]), ppo_epochs=int(spec["ppo_epochs"]),
                       gradient_accumulation_steps=1, init_kl_coef=float(kl["init_coef"]),
                       adap_kl_ctrl=bool(kl["adaptive"]), target=float(kl["target"]), horizon=float(kl["horizon"]),
                       seed=seed, log_with=None, remove_unused_columns=False)
    trainer = PPOTrainer(config=config, model=model, ref_model=None, tokenizer=tok)

    reward_tok = AutoTokenizer.from_pretrained(spec["reward"])
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward"]).eval().requires_grad_(False)
    label = {v: int(k) for k, v in reward.config.id2label.items()}[spec["reward_label"]]
    max_len = min(reward_tok.model_max_length, reward.config.max_position_embeddings - reward_tok.pad_token_id - 1)

    @torch.inference_mode()
    def score(texts: list[str]) -> list[torch.Tensor]:
        enc = reward_tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return list(reward(**enc).logits[:, label].float())

    gen_kwargs = {"do_sample": True, "top_k": int(gen["top_k"]), "top_p": float(gen["top_p"]),
                  "temperature": float(gen["temperature"]), "min_new_tokens": int(gen["min_new_tokens"]),
                  "max_new_tokens": int(gen["max_new_tokens"]), "pad_token_id": tok.pad_token_id,
                  "eos_token_id": tok.eos_token_id}
    mode = gen.get("mode", "batched")
    if mode not in ("batched", "loop"):
        raise SystemExit(f"generation.mode must be batched or loop, not {mode!r}")
    length_sampler = LengthSampler(int(gen["min_new_tokens"]), int(gen["max_new_tokens"]) + 1)
    device = trainer.accelerator.device
    prompts = [torch.tensor(p, dtype=torch.long, device=device) for p in spec["prompts"]]
    order: list[int] = []
    rng = random.Random(seed)
    steps = []
    for _ in range(int(spec["steps"])):
        t0 = time.perf_counter()
        if len(order) < B:  # a fresh shuffled pass over the prompts
            perm = list(range(len(prompts)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:B], order[B:]
        queries = [prompts[i] for i in idx]
        if mode == "batched":
            responses = trainer.generate(queries, return_prompt=False, batch_size=B, **gen_kwargs)
        else:  # the notebook's loop: one prompt per generate call, its own max_new_tokens each
            responses = []
            for q in queries:
                n = length_sampler()
                out = trainer.generate(q, **{**gen_kwargs, "max_new_tokens": n})
                responses.append(out.squeeze()[-n:])  # the notebook's cut, for both kinds
        generate_s = time.perf_counter() - t0
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        scores = score(texts)
        stats = trainer.step(queries, responses, scores)
        steps.append({"responses": texts, "kl": float(stats["objective/kl"]),
                      "kl_coef": float(stats["objective/kl_coef"]),
                      "logged_reward": float(torch.stack(scores).mean()), "seconds": time.perf_counter() - t0,
                      "generate_seconds": generate_s})
    import accelerate
    import resource

    versions = {m.__name__: m.__version__ for m in (trl, transformers, torch, peft, accelerate)}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"steps": steps, "versions": versions, "trainable_parameters": trainable,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: trl011_baseline.py SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    result = run(spec)
    tmp = Path(spec["out"]).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, spec["out"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
