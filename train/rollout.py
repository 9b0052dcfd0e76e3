"""Batched rollout generation: k responses per prompt sampled from the policy, padded into one `Rollout`.

Shapes: a rollout batch holds B responses (prompts x k). Prompts are padded per batch (right for seq2seq, left for
causal) — never to a fixed length. Responses are right-padded to the longest in the batch; `response_mask` is 1 up
to and including the first EOS and 0 after it.

Two engines (`generation.engine`), both transformers' own `generate()` with the same sampling code (logits
processors, temperature / top-k / top-p, min_new_tokens, EOS and per-row stopping, left-padded causal prompts with
position ids from the mask), so they sample the same distribution:
- `hf`: the dynamic KV cache (a tensor grown every step), eager.
- `static`: a preallocated `StaticCache` (seq2seq: `EncoderDecoderCache` of a self-attention and a cross-attention
  `StaticCache`) whose shapes do not change from step to step, so the decode step can be compiled with
  `torch.compile` (transformers compiles the decode step only, the prefill stays eager; CUDA graphs on GPUs via
  the "reduce-overhead" mode). Shapes are kept few so the compiled step is reused: generate() sees the prompts
  padded to a multiple of `generation.static_pad_multiple` (the rollout keeps them as they were), and the cache is
  sized for the longest response the run can draw. Unsupported models or settings fall back to `hf` with one
  logged reason (`plan_engine`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn
from transformers import CompileConfig, GenerationConfig as HFGenerationConfig, PreTrainedTokenizerBase
from transformers.modeling_outputs import BaseModelOutput

from detoxrl.train.config import GenerationConfig
from detoxrl.train.models import PolicyWithValue
from detoxrl.train.ppo_math import logprobs_from_logits

log = logging.getLogger("detoxrl.models")


@dataclass
class Rollout:
    prompt_ids: torch.Tensor       # (B, P) padded (right for seq2seq, left for causal)
    prompt_mask: torch.Tensor      # (B, P)
    response_ids: torch.Tensor     # (B, T) right-padded with pad id
    response_mask: torch.Tensor    # (B, T) 1 up to and including the first EOS
    ended: torch.Tensor            # (B,) bool: the response contains EOS
    # seq2seq: the policy encoder's last hidden state (B, P, d) of each row's prompt, computed once for sampling
    # and reused by the old log-prob pass (the weights have not changed in between); None for causal policies
    encoder_states: Optional[torch.Tensor] = None
    # ppo.rollout_logprobs: the sampling pass's log-probs (B, T) of the sampled tokens (at generation.temperature)
    # and, for a value head on the policy, its last hidden state (B, T, d) before each token; None otherwise
    logprobs: Optional[torch.Tensor] = None
    last_hidden: Optional[torch.Tensor] = None


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


def _pad_right(t: torch.Tensor, length: int, value: int = 0) -> torch.Tensor:
    """(B, T', ...) -> (B, length, ...): `value` appended along dim 1 (ids, masks, log-probs, hidden states)."""
    if t.shape[1] >= length:
        return t
    return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, length - t.shape[1]), value=value)


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


@dataclass(frozen=True)
class EnginePlan:
    """What `generate_rollouts` runs: the engine, whether the decode step is compiled, and why not what was asked."""
    engine: str                   # hf | static
    compile: bool = False
    compile_mode: str = "default"    # torch.compile mode: reduce-overhead (CUDA graphs) on GPUs
    fallback: Optional[str] = None   # the reason the static engine (or its compilation) is not used


def _base_model(lm: nn.Module) -> nn.Module:
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def plan_engine(lm: nn.Module, gen: GenerationConfig, device: torch.device, synced_gpus: bool) -> EnginePlan:
    """The engine for this model and these settings; a fallback to `hf` (or to no compilation) names its reason,
    logged once per reason."""
    if gen.engine == "hf":
        return EnginePlan("hf")
    base = _base_model(lm)
    reason = None
    if synced_gpus:
        reason = ("generation on ZeRO-3-sharded weights (generation.zero3_gather_weights=false) steps every rank in "
                  "lock-step with synced_gpus; the static cache is not used there")
    elif not getattr(base, "_can_compile_fullgraph", False):
        reason = (f"{type(base).__name__} does not declare support for a static KV cache and compilation in "
                  f"transformers (_can_compile_fullgraph)")
    if reason:
        _warn_once(f"engine-{reason}", f"generation.engine=static: falling back to hf: {reason}")
        return EnginePlan("hf", fallback=reason)
    want = gen.compile if gen.compile != "auto" else ("always" if device.type == "cuda" else "never")
    if want == "always" and getattr(base, "hf_quantizer", None) is not None and not base.hf_quantizer.is_compileable:
        why = "the quantized base weights (policy.quantization) cannot be compiled; the static cache runs eager"
        _warn_once(f"compile-{why}", f"generation.compile: {why}")
        return EnginePlan("static", False, why)
    return EnginePlan("static", want == "always", compile_mode="reduce-overhead" if device.type == "cuda" else "default")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def hf_generation_config(lm: nn.Module, tokenizer: PreTrainedTokenizerBase, gen: GenerationConfig,
                         max_new_tokens: int, k: int, plan: EnginePlan, causal: bool,
                         prompt_len: int = 0) -> HFGenerationConfig:
    """transformers' GenerationConfig for one generate() call: every distribution-changing field neutral, the
    `generation.*` sampling settings, and with the static engine its cache (sized for the longest response the run
    can draw, so one compiled decode step serves the whole run) and compile settings."""
    fields = {
        # (min_length: left unset, so the emptied model config makes it 0 without transformers' warning about it)
        **{f: v for f, v in NEUTRAL_GENERATION.items() if f != "min_length"}, "do_sample": gen.do_sample,
        "top_k": gen.top_k if gen.do_sample else 0, "top_p": gen.top_p if gen.do_sample else 1.0,
        "temperature": gen.temperature if gen.do_sample else 1.0, "min_new_tokens": gen.min_new_tokens,
        "max_new_tokens": max_new_tokens, "num_return_sequences": k, "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
        "decoder_start_token_id": getattr(lm.config, "decoder_start_token_id", None), "use_cache": True}
    if plan.engine == "static":
        longest = max(max_new_tokens, gen.max_new_tokens, (gen.max_new_tokens_range or [0, 0])[1])
        # seq2seq: the self-attention cache holds the decoder's tokens (start + response); the cross-attention
        # cache is sized by transformers from the encoder's (padded) length
        need = (prompt_len + longest) if causal else longest + 1
        fields.update(cache_implementation="static", max_cache_len=_round_up(need, gen.static_pad_multiple))
        if plan.compile:
            cfg = CompileConfig(fullgraph=False, dynamic=False, mode=plan.compile_mode)
            cfg._compile_all_devices = True  # transformers compiles on CUDA only unless told (the CPU: compile=always)
            fields["compile_config"] = cfg
    fields["disable_compile"] = not plan.compile
    return HFGenerationConfig(**fields)


def pad_for_engine(ids: torch.Tensor, mask: torch.Tensor, pad_id: int, left: bool, plan: EnginePlan,
                   multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The static engine's generate() input: prompts padded further to a multiple of `multiple` columns (left for
    causal, right for seq2seq; masked, so the same function), so that few shapes reach the compiled step."""
    if plan.engine != "static":
        return ids, mask
    extra = _round_up(ids.shape[1], multiple) - ids.shape[1]
    if extra == 0:
        return ids, mask
    pad = (extra, 0) if left else (0, extra)
    return (torch.nn.functional.pad(ids, pad, value=pad_id), torch.nn.functional.pad(mask, pad, value=0))


def kept_from_sampling(out, kind: str, response: torch.Tensor, temperature: float,
                       keep_hidden: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """ppo.rollout_logprobs: from generate()'s per-step raw logits (before any logits processor) the log-probs of
    the sampled tokens, (B, T); with `keep_hidden` the last hidden state at each step's newest position, (B, T, d)
    (the causal prefill step holds the whole prompt: its last column is the position that predicts token 1)."""
    logp = logprobs_from_logits(torch.stack(out.logits, dim=1), response, temperature).float()
    if not keep_hidden:
        return logp, None
    steps = out.decoder_hidden_states if kind == "seq2seq" else out.hidden_states
    return logp, torch.cat([layers[-1][:, -1:] for layers in steps], dim=1)


def generate_rollouts(policy: PolicyWithValue, prompts: list[list[int]], tokenizer: PreTrainedTokenizerBase,
                      gen: GenerationConfig, max_new_tokens: int, device: torch.device,
                      synced_gpus: bool = False, k: int = 1, keep_logprobs: bool = False,
                      keep_hidden: bool = False) -> Rollout:
    """Batched sampling in chunks of `gen.rollout_batch_size` prompts, `k` responses per prompt (rows
    `i*k .. i*k+k-1` answer prompt i). seq2seq encodes each prompt once (generate() expands the encoder outputs k
    times); causal prompts are repeated. Returns one padded Rollout for all responses; with `keep_logprobs` (and
    `keep_hidden`) it also holds the sampling pass's log-probs (and last hidden states), `kept_from_sampling`."""
    lm = policy.lm
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    left = policy.kind == "causal"
    plan = plan_engine(lm, gen, device, synced_gpus)
    longest_prompt = _round_up(max(len(p) for p in prompts), gen.static_pad_multiple)
    hf_gen = hf_generation_config(lm, tokenizer, gen, max_new_tokens, k, plan, left, longest_prompt)
    chunks_ids, chunks_resp, chunks_enc, chunks_kept = [], [], [], []
    if keep_logprobs:
        hf_gen.update(return_dict_in_generate=True, output_logits=True, output_hidden_states=keep_hidden)
    with torch.no_grad(), _own_config_only(lm):
        for start in range(0, len(prompts), gen.rollout_batch_size):
            chunk = prompts[start:start + gen.rollout_batch_size]
            ids, mask = pad_prompts(chunk, pad_id, left, device)
            gen_ids, gen_mask = pad_for_engine(ids, mask, pad_id, left, plan, gen.static_pad_multiple)
            extra = {}
            if not left:  # seq2seq: encode here, once, and keep it for the old log-probs (the engine's extra
                # padding columns get zeros: masked in the cross-attention, so both engines see the same states)
                enc = lm.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
                wide = torch.nn.functional.pad(enc, (0, 0, 0, gen_ids.shape[1] - ids.shape[1]))
                extra["encoder_outputs"] = BaseModelOutput(last_hidden_state=wide)
                chunks_enc.append(enc.repeat_interleave(k, dim=0))
            out = lm.generate(input_ids=gen_ids, attention_mask=gen_mask, generation_config=hf_gen,
                              synced_gpus=synced_gpus, **extra)
            seqs = out.sequences if keep_logprobs else out
            if k > 1:
                ids, mask = ids.repeat_interleave(k, dim=0), mask.repeat_interleave(k, dim=0)
            resp = seqs[:, 1:] if policy.kind == "seq2seq" else seqs[:, gen_ids.shape[1]:]
            chunks_ids.append((ids, mask))
            chunks_resp.append(resp)
            if keep_logprobs:
                chunks_kept.append(kept_from_sampling(out, policy.kind, resp, gen.temperature, keep_hidden))
                del out  # the chunk's (rows, T, V) logits
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
    encoder_states = torch.cat([_pad_right(e, P) for e in chunks_enc]) if chunks_enc else None
    logprobs = torch.cat([_pad_right(lp, T) for lp, _ in chunks_kept]) if keep_logprobs else None
    hidden = torch.cat([_pad_right(h, T) for _, h in chunks_kept]) if keep_logprobs and keep_hidden else None
    return Rollout(torch.cat(prompt_ids), torch.cat(prompt_mask), response, resp_mask, ended, encoder_states,
                   logprobs, hidden)
