"""Batched rollout generation: k responses per prompt sampled from the policy, padded into one `Rollout`.

Shapes: a rollout batch holds B responses (prompts x k). Prompts are padded per batch (right for seq2seq, left for
causal) — never to a fixed length. Responses are right-padded to the longest in the batch; `response_mask` is 1 up
to and including the first EOS and 0 after it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from transformers import GenerationConfig as HFGenerationConfig, PreTrainedTokenizerBase

from detoxrl.train.config import GenerationConfig
from detoxrl.train.models import PolicyWithValue

log = logging.getLogger("detoxrl.models")


@dataclass
class Rollout:
    prompt_ids: torch.Tensor       # (B, P) padded (right for seq2seq, left for causal)
    prompt_mask: torch.Tensor      # (B, P)
    response_ids: torch.Tensor     # (B, T) right-padded with pad id
    response_mask: torch.Tensor    # (B, T) 1 up to and including the first EOS
    ended: torch.Tensor            # (B,) bool: the response contains EOS


def pad_prompts(prompts: list[list[int]], pad_id: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        if left:
            ids[i, P - len(p):] = torch.tensor(p)
            mask[i, P - len(p):] = 1
        else:
            ids[i, :len(p)] = torch.tensor(p)
            mask[i, :len(p)] = 1
    return ids.to(device), mask.to(device)


def mask_after_eos(response_ids: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask (1 up to and including the first EOS), the ids with everything after EOS set to pad, and `ended`."""
    is_eos = response_ids == eos_id
    # number of EOS tokens strictly before position t
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    mask = (before == 0).long()
    ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    return mask, ids, is_eos.any(dim=1)


def _pad_right(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    if t.shape[1] >= length:
        return t
    return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)


# Neutral values of every generation field that reshapes the sampling distribution. transformers fills each field
# left unset from the model's own generation_config (a checkpoint shipping repetition_penalty=1.2 would otherwise
# sample off-policy), so all of them are set, and the model's config is kept out of generate() (`_own_config_only`).
NEUTRAL_GENERATION = {
    "num_beams": 1, "num_beam_groups": 1, "diversity_penalty": 0.0, "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "min_length": 0, "typical_p": 1.0, "min_p": None, "top_h": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "length_penalty": 1.0, "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None,
    "exponential_decay_length_penalty": None, "guidance_scale": None, "renormalize_logits": False,
    "remove_invalid_values": False, "penalty_alpha": None, "dola_layers": None, "constraints": None,
    "force_words_ids": None, "watermarking_config": None, "stop_strings": None, "max_time": None,
}
_warned: set[str] = set()


def non_neutral_generation_fields(model_generation_config) -> dict[str, object]:
    """Fields of a model's own generation_config that would change the sampling distribution."""
    own = model_generation_config.to_dict() if model_generation_config is not None else {}
    return {k: own[k] for k, neutral in NEUTRAL_GENERATION.items()
            if own.get(k) is not None and own.get(k) != neutral and own.get(k) != []}


def sampling_mismatches(gen: GenerationConfig) -> list[str]:
    """Why responses sampled with `gen` do not come from the distribution the PPO loss scores (the policy's
    softmax at `gen.temperature`): the update is then off-policy by that much."""
    if not gen.do_sample:
        return ["generation.do_sample=false: responses are greedy, but the loss scores them under the policy's "
                f"softmax at temperature {gen.temperature}, a distribution they were not drawn from"]
    out = []
    if gen.top_k > 0:
        out.append(f"generation.top_k={gen.top_k} samples from the {gen.top_k} likeliest tokens only")
    if gen.top_p < 1.0:
        out.append(f"generation.top_p={gen.top_p} samples from a truncated nucleus")
    if gen.min_new_tokens > 0:
        out.append(f"generation.min_new_tokens={gen.min_new_tokens} forbids EOS for the first "
                   f"{gen.min_new_tokens} token(s)")
    return out


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


@contextlib.contextmanager
def _own_config_only(lm: nn.Module) -> Iterator[None]:
    """generate() with an empty model generation_config: nothing is inherited from the checkpoint's."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    saved = base.generation_config
    odd = non_neutral_generation_fields(saved)
    if odd:
        _warn_once(f"model-generation-config-{sorted(odd.items())}",
                   f"the policy's own generation_config sets {odd}: ignored, responses are sampled with the "
                   f"generation.* settings only (PPO must sample from the distribution it scores)")
    base.generation_config = HFGenerationConfig()
    try:
        yield
    finally:
        base.generation_config = saved


def generate_rollouts(policy: PolicyWithValue, prompts: list[list[int]], tokenizer: PreTrainedTokenizerBase,
                      gen: GenerationConfig, max_new_tokens: int, device: torch.device,
                      synced_gpus: bool = False, k: int = 1) -> Rollout:
    """Batched sampling in chunks of `gen.rollout_batch_size` prompts, `k` responses per prompt (rows
    `i*k .. i*k+k-1` answer prompt i). seq2seq encodes each prompt once (generate() expands the encoder outputs k
    times); causal prompts are repeated. Returns one padded Rollout for all responses."""
    lm = policy.lm
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    hf_gen = HFGenerationConfig(**{
        # (min_length: left unset, so the emptied model config makes it 0 without transformers' warning about it)
        **{k: v for k, v in NEUTRAL_GENERATION.items() if k != "min_length"}, "do_sample": gen.do_sample, "top_k": gen.top_k if gen.do_sample else 0,
        "top_p": gen.top_p if gen.do_sample else 1.0, "temperature": gen.temperature if gen.do_sample else 1.0,
        "min_new_tokens": gen.min_new_tokens, "max_new_tokens": max_new_tokens, "num_return_sequences": k,
        "pad_token_id": pad_id, "eos_token_id": eos_id, "bos_token_id": tokenizer.bos_token_id,
        "decoder_start_token_id": getattr(lm.config, "decoder_start_token_id", None), "use_cache": True})
    left = policy.kind == "causal"
    chunks_ids, chunks_resp = [], []
    with torch.no_grad(), _own_config_only(lm):
        for start in range(0, len(prompts), gen.rollout_batch_size):
            chunk = prompts[start:start + gen.rollout_batch_size]
            ids, mask = pad_prompts(chunk, pad_id, left, device)
            out = lm.generate(input_ids=ids, attention_mask=mask, generation_config=hf_gen, synced_gpus=synced_gpus)
            if k > 1:
                ids, mask = ids.repeat_interleave(k, dim=0), mask.repeat_interleave(k, dim=0)
            resp = out[:, 1:] if policy.kind == "seq2seq" else out[:, ids.shape[1]:]
            chunks_ids.append((ids, mask))
            chunks_resp.append(resp)
    P = max(i.shape[1] for i, _ in chunks_ids)
    T = max(r.shape[1] for r in chunks_resp)
    prompt_ids, prompt_mask = [], []
    for ids, mask in chunks_ids:
        if left:
            prompt_ids.append(torch.nn.functional.pad(ids, (P - ids.shape[1], 0), value=pad_id))
            prompt_mask.append(torch.nn.functional.pad(mask, (P - mask.shape[1], 0), value=0))
        else:
            prompt_ids.append(_pad_right(ids, P, pad_id))
            prompt_mask.append(_pad_right(mask, P, 0))
    response = torch.cat([_pad_right(r, T, pad_id) for r in chunks_resp], dim=0)
    # Padding inside one chunk (a row that ended early) is pad, which can equal EOS (GPT-2): the first EOS wins.
    resp_mask, response, ended = mask_after_eos(response, eos_id, pad_id)
    if resp_mask.shape[1] == 0:
        raise RuntimeError("generation returned no tokens")
    return Rollout(torch.cat(prompt_ids), torch.cat(prompt_mask), response, resp_mask, ended)
