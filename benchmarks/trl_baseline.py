"""Baseline B: TRL 1.12's PPO (`trl.experimental.ppo.PPOTrainer`, decoder-only), timed on the same models, prompts and
settings as detoxrl's causal configuration.

Runs INSIDE the separate TRL virtualenv (benchmarks/trl_env.py builds it); it imports neither detoxrl nor anything
from this repository, and reads everything it needs from one JSON spec:

    <trl-venv>/bin/python benchmarks/trl_baseline.py SPEC.json OUT.json

spec keys: policy, reward, value_init (model folders), prompts (token-id lists, already cut to the prompt length),
batch_size, mini_batch_size, ppo_epochs, response_length, steps, lora {r, alpha, dropout, target_modules}, lr,
kl_coef, temperature, seed, threads, device (cpu|cuda), dtype (float32|bfloat16), workdir; optional (the learning
benchmark, benchmarks/learning.py): reward_label (then the reward is a classifier with its OWN tokenizer, see below),
stop_token ("eos": responses end at the first EOS).

A reward classifier with its own tokenizer: TRL 1.12's PPO feeds the policy's token ids straight into the reward
model (`trl.experimental.utils.get_reward`), so it cannot score with a classifier that tokenizes differently. With
`reward_label` set, the trainer's `get_reward` is wrapped: for the reward model only, the (EOS-truncated) responses
are decoded with the policy tokenizer and re-tokenized by the classifier's own, and the score is that label's logit
(what detoxrl does); the value model keeps TRL's own path, initialised from the policy (`value_init`). Each step's
decoded responses are returned (`responses`) for the benchmark's shared measures.

How detoxrl's settings map onto TRL's (read from trl/experimental/ppo/ppo_trainer.py, trl 1.12.0):
- batch B, mini-batch M: per_device_train_batch_size=B, gradient_accumulation_steps=1, num_mini_batches=B/M. TRL's
  `gradient_accumulation_steps` multiplies the rollout batch AND accumulates across mini-batches, so 1 is the only
  value that gives one optimizer step per mini-batch, as detoxrl does.
- fixed response length T: response_length=T with no stop token (TRL never stops early), detoxrl min=max=T.
- the KL penalty is fixed (TRL has no adaptive controller); TRL never clips gradients (detoxrl runs with
  ppo.max_grad_norm=null for the comparison); lr schedule constant; no dropout anywhere; temperature 1.
- TRL needs a reward model that shares the policy tokenizer and has a `score` head with one logit, and trains a
  SEPARATE full value network (here initialised from the reward model, as TRL's example script does); detoxrl trains
  a linear value head on the policy's own hidden states.

Timings: wall seconds per PPO step from a TrainerCallback (on_step_end; CUDA synchronised), and the rollout
generation inside it (TRL's `batch_generation`, wrapped). The mean score per step comes from TRL's own log
(`objective/scores`, the raw reward-model logit before any penalty).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path


def _sync(device: str) -> None:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(spec: dict) -> dict:
    import torch

    torch.set_num_threads(int(spec["threads"]))
    import datasets
    import peft
    import transformers
    import trl
    from peft import LoraConfig
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    device = spec["device"]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    B, M = int(spec["batch_size"]), int(spec["mini_batch_size"])
    steps = int(spec["steps"])

    tok = AutoTokenizer.from_pretrained(spec["policy"])
    tok.padding_side = "left"
    if tok.pad_token is None:
        raise ValueError("the policy tokenizer needs a pad token distinct from EOS for TRL's PPO")
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=dtype)
    own_tokenizer = spec.get("reward_label") is not None
    if own_tokenizer:
        reward = AutoModelForSequenceClassification.from_pretrained(spec["reward"], dtype=dtype)
        _score_with_own_tokenizer(ppo_module, reward, tok, spec, device)
    else:
        reward = AutoModelForSequenceClassification.from_pretrained(spec["reward"], dtype=dtype, num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(spec["value_init"], dtype=dtype, num_labels=1)
    train_ds = datasets.Dataset.from_dict({"input_ids": spec["prompts"]})

    timings = {"step_end": [], "generate": [], "scores": [], "kl": []}
    start = {}

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            _sync(device)
            start["t"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "objective/scores" in logs:
                timings["scores"].append(float(logs["objective/scores"]))
                timings["kl"].append(float(logs.get("objective/kl", float("nan"))))

        def on_step_end(self, args, state, control, **kw):
            _sync(device)
            timings["step_end"].append(time.perf_counter())

    original_generation = ppo_module.batch_generation

    def timed_generation(*args, **kwargs):
        _sync(device)
        t0 = time.perf_counter()
        out = original_generation(*args, **kwargs)
        _sync(device)
        timings["generate"].append(time.perf_counter() - t0)
        return out

    ppo_module.batch_generation = timed_generation
    workdir = spec.get("workdir") or tempfile.mkdtemp(prefix="trl-ppo-")
    lora = spec["lora"]
    args = PPOConfig(
        output_dir=workdir, per_device_train_batch_size=B, gradient_accumulation_steps=1, num_mini_batches=B // M,
        num_ppo_epochs=int(spec["ppo_epochs"]), total_episodes=steps * B, response_length=int(spec["response_length"]),
        local_rollout_forward_batch_size=B, temperature=float(spec["temperature"]), kl_coef=float(spec["kl_coef"]),
        kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95,
        whiten_rewards=False, stop_token=spec.get("stop_token"), missing_eos_penalty=None, learning_rate=float(spec["lr"]),
        lr_scheduler_type="constant", seed=int(spec["seed"]), bf16=dtype == torch.bfloat16, fp16=False,
        gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        num_sample_generations=0, use_cpu=device == "cpu", dataloader_num_workers=0)
    peft_config = LoraConfig(r=int(lora["r"]), lora_alpha=int(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                             target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM")
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=train_ds, value_model=value, eval_dataset=train_ds.select(range(B)),
                         peft_config=peft_config, callbacks=[Timer()])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _reset_peak_rss()
    trainer.train()
    ends = timings["step_end"]
    step_seconds = [b - a for a, b in zip([start["t"]] + ends[:-1], ends)]
    versions = {m.__name__: m.__version__ for m in (trl, transformers, torch, peft, datasets)}
    import accelerate
    versions["accelerate"] = accelerate.__version__
    out = {"steps": [{"responses": texts, "kl": kl, "seconds": sec} for texts, kl, sec in
                     zip(reward.recorded, timings["kl"], step_seconds)]} if own_tokenizer else {}
    return {
        **out, "versions": versions,
        "step_seconds": step_seconds, "generate_seconds": timings["generate"], "scores": timings["scores"],
        "kl": timings["kl"], "trainable_parameters": trainable, "peak_rss_mb": _peak_rss_mb(),
        "gpu_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "versions": versions, "threads": torch.get_num_threads(), "device": device,
    }


def _score_with_own_tokenizer(ppo_module, reward, policy_tok, spec: dict, device: str) -> None:
    """Route TRL's reward call for `reward` through text: decode with the policy tokenizer, re-tokenize with the
    classifier's own, score `spec["reward_label"]`'s logit; each call's texts are kept in `reward.recorded`."""
    import torch
    from transformers import AutoTokenizer

    reward_tok = AutoTokenizer.from_pretrained(spec["reward"])
    label = {v: int(k) for k, v in reward.config.id2label.items()}[spec["reward_label"]]
    max_len = min(reward_tok.model_max_length, reward.config.max_position_embeddings - reward_tok.pad_token_id - 1)
    reward.recorded = []
    original = ppo_module.get_reward

    def get_reward(model, query_responses, pad_token_id, context_length):
        if model is not reward:
            return original(model, query_responses, pad_token_id, context_length)
        texts = [policy_tok.decode(r[r != pad_token_id], skip_special_tokens=True)
                 for r in query_responses[:, context_length:]]
        reward.recorded.append(texts)
        enc = reward_tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt").to(device)
        with torch.no_grad():
            score = reward(**enc).logits[:, label].float()
        return None, score, None

    ppo_module.get_reward = get_reward


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: trl_baseline.py SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    result = run(spec)
    tmp = Path(argv[1]).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
