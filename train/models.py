"""The policy (base + LoRA + value head), the frozen reference, and batched rollout generation.

Shapes used throughout: a rollout batch holds B prompts and B responses. Prompts are padded per batch (right for
seq2seq, left for causal) — never to a fixed length. Responses are right-padded to the longest in the batch;
`response_mask` is 1 up to and including the first EOS and 0 after it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer,
                          GenerationConfig as HFGenerationConfig, PreTrainedTokenizerBase)

from detoxrl.train.config import CriticConfig, GenerationConfig, LoraConfig, PolicyConfig, ReferenceConfig
from detoxrl.train.ppo_math import logprobs_from_logits

log = logging.getLogger("detoxrl.models")

REFERENCE_ADAPTER = "reference"
TRAINABLE_ADAPTER = "default"
CRITIC_ADAPTER = "critic"


def resolve_dtype(name: str, device: torch.device, mixed_precision: str = "no") -> torch.dtype:
    """`auto`: float32 on the CPU; on a GPU the launch's mixed precision (fp16 / bf16), else bfloat16 if supported."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        if mixed_precision == "fp16":
            return torch.float16
        if mixed_precision == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_device(name: str, default: torch.device) -> torch.device:
    """`auto` -> `default`; otherwise the named device, checked to exist."""
    if name == "auto":
        return default
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def detect_kind(model_path: str, kind: str, revision: Optional[str] = None, trust_remote_code: bool = False) -> str:
    if kind != "auto":
        return kind
    cfg = AutoConfig.from_pretrained(model_path, revision=revision, trust_remote_code=trust_remote_code)
    return "seq2seq" if getattr(cfg, "is_encoder_decoder", False) else "causal"


def load_tokenizer(model_path: str, kind: str, revision: Optional[str] = None,
                   trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(model_path, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer of {model_path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token  # GPT-2 style: pad with EOS; the response mask handles it
    tok.padding_side = "left" if kind == "causal" else "right"
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer of {model_path} has no eos token; responses could never end")
    return tok


def _hidden_size(config) -> int:
    for name in ("d_model", "hidden_size", "n_embd"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ValueError(f"cannot find the hidden size in {type(config).__name__}")


def context_window(config) -> Optional[int]:
    """Absolute position limit of a causal model (None for relative-position models like T5)."""
    for name in ("n_positions", "max_position_embeddings"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


def _auto_model_class(kind: str):
    return AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM


def _disable_dropout(model: nn.Module) -> None:
    # PPO needs the same function for sampling and for the loss: no dropout anywhere.
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def bitsandbytes_config(quantization: str, compute_dtype: torch.dtype, device: torch.device):
    """transformers' BitsAndBytesConfig for `policy.quantization` (8bit, or 4bit NF4 with double quantization)."""
    if device.type != "cuda":
        raise ValueError(f"policy.quantization={quantization} needs a CUDA device, but the model goes to {device}; "
                         "bitsandbytes quantization is GPU only")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError(f"policy.quantization={quantization} needs bitsandbytes: pip install bitsandbytes") from err
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_base_model(path: str, kind: str, dtype: torch.dtype, revision: Optional[str], trust_remote_code: bool,
                    quantization: Optional[str] = None, device: Optional[torch.device] = None):
    """The pretrained model, dropout off; with `quantization`, loaded straight onto `device` by bitsandbytes."""
    extra = {}
    if quantization:
        extra = {"quantization_config": bitsandbytes_config(quantization, dtype, device), "device_map": {"": device}}
    model = _auto_model_class(kind).from_pretrained(path, dtype=dtype, revision=revision,
                                                    trust_remote_code=trust_remote_code, **extra)
    _disable_dropout(model)
    return model


def lm_forward(lm: nn.Module, kind: str, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
               response_ids: torch.Tensor, want_hidden: bool, group: int = 1,
               want_logits: bool = True) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Logits (B, T, V) predicting each response token and, if asked, the last hidden state at those positions.

    `group` > 1 (seq2seq): rows come in groups of `group` responses to the same prompt; the encoder runs once per
    prompt and its outputs are expanded (for the passes without gradients; a gradient pass keeps one row per
    prompt copy). `want_logits=False` (causal) computes the logits of one position only (for a critic's hidden
    states); logits are then None."""
    if kind == "seq2seq":
        start = lm.config.decoder_start_token_id
        dec_in = torch.cat([torch.full_like(response_ids[:, :1], start), response_ids[:, :-1]], dim=1)
        inputs = {"input_ids": prompt_ids}
        if group > 1:
            encoder = lm.get_encoder()
            enc = encoder(input_ids=prompt_ids[::group], attention_mask=prompt_mask[::group])
            inputs = {"encoder_outputs": (enc.last_hidden_state.repeat_interleave(group, dim=0),)}
        out = lm(**inputs, attention_mask=prompt_mask, decoder_input_ids=dec_in, output_hidden_states=want_hidden,
                 use_cache=False)
        hidden = out.decoder_hidden_states[-1] if want_hidden else None
        return (out.logits if want_logits else None), hidden
    # causal: [left-padded prompt | response]; logits at position i predict token i+1
    P = prompt_ids.shape[1]
    T = response_ids.shape[1]
    ids = torch.cat([prompt_ids, response_ids], dim=1)
    # response padding is attended by nobody before it (causal), so ones are fine for the response part
    mask = torch.cat([prompt_mask, torch.ones_like(response_ids)], dim=1)
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    extra = {}
    if _accepts_logits_to_keep(lm):
        # only the last T+1 positions' logits (P-1 .. P+T-1): no (B, P+T, V) tensor for the prompt's positions
        extra["logits_to_keep"] = T + 1 if want_logits else 1
    out = lm(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=want_hidden, use_cache=False,
             **extra)
    logits = None
    if want_logits:
        logits = out.logits[:, :T] if extra else out.logits[:, P - 1:P - 1 + T]
    hidden = out.hidden_states[-1][:, P - 1:P - 1 + T] if want_hidden else None
    return logits, hidden


def _accepts_logits_to_keep(lm: nn.Module) -> bool:
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    cached = getattr(base, "_detoxrl_logits_to_keep", None)
    if cached is None:
        cached = "logits_to_keep" in inspect.signature(base.forward).parameters
        base._detoxrl_logits_to_keep = cached
    return cached


@contextlib.contextmanager
def active_adapter(lm: nn.Module, name: Optional[str]) -> Iterator[None]:
    """Run `lm` (a PeftModel) with only adapter `name` active, or with every adapter off (None).

    Unlike PEFT's `set_adapter` / `disable_adapter`, this leaves `requires_grad` alone: the policy and critic
    adapters both stay trainable (PEFT would freeze the inactive one, and DDP / DeepSpeed fix the trainable set at
    setup). Only the layers' routing flags change, and they are restored on exit."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in lm.modules() if isinstance(m, BaseTunerLayer)]
    saved = [(m._active_adapter, m._disable_adapters) for m in layers]
    for m in layers:
        if name is None:
            m._disable_adapters = True
        else:  # a layer without that adapter then runs its base weights only (LoRA skips unknown names)
            m._active_adapter, m._disable_adapters = [name], False
    try:
        yield
    finally:
        for m, (act, dis) in zip(layers, saved):
            m._active_adapter, m._disable_adapters = act, dis


class PolicyWithValue(nn.Module):
    """A PEFT-wrapped language model plus a scalar value head.

    `critic_mode`: `shared` (the head on the policy's last hidden state), `detached` (the same, detached: the value
    loss trains the head only), `adapter` (the head on the last hidden state of a second LoRA adapter, `critic`, on
    the same base: a second forward pass). Only LoRA weights and the value head are trainable.
    """

    def __init__(self, lm: nn.Module, kind: str, value_head_init_std: float = 0.0,
                 has_reference_adapter: bool = False, critic_mode: str = "shared") -> None:
        super().__init__()
        self.lm = lm
        self.kind = kind
        self.has_reference_adapter = has_reference_adapter
        if critic_mode not in ("shared", "detached", "adapter"):
            raise ValueError(f"unknown critic mode {critic_mode!r}; valid: shared, detached, adapter")
        self.critic_mode = critic_mode
        hidden = _hidden_size(lm.config)
        self.v_head = nn.Linear(hidden, 1)
        with torch.no_grad():
            if value_head_init_std > 0:
                self.v_head.weight.normal_(0.0, value_head_init_std)
            else:
                self.v_head.weight.zero_()
            self.v_head.bias.zero_()
        self.v_head.to(dtype=torch.float32)

    def forward(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                want_values: bool = True, group: int = 1) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits (B, T, V) predicting each response token, and values (B, T) of the state before it (None unless
        `want_values`). `group`: see `lm_forward` (passes without gradients only)."""
        separate = self.critic_mode == "adapter"
        # the policy's pass runs with whatever is active: the policy adapter, or the reference in reference_mode
        logits, hidden = lm_forward(self.lm, self.kind, prompt_ids, prompt_mask, response_ids,
                                    want_values and not separate, group)
        values = None
        if want_values:
            if separate:
                with active_adapter(self.lm, CRITIC_ADAPTER):
                    _, hidden = lm_forward(self.lm, self.kind, prompt_ids, prompt_mask, response_ids, True, group,
                                           want_logits=False)
            elif self.critic_mode == "detached":  # the value loss then trains the head only, never the LoRA layers
                hidden = hidden.detach()
            # the head is float32, except under DeepSpeed bf16/fp16, which casts the whole module
            values = self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1).float()
        return logits, values

    @contextlib.contextmanager
    def reference_mode(self) -> Iterator[None]:
        """The starting policy on the shared base: every adapter off, or only the frozen SFT copy on."""
        with active_adapter(self.lm, REFERENCE_ADAPTER if self.has_reference_adapter else None):
            yield

    def critic_parameters(self) -> list[nn.Parameter]:
        """The parameters the value loss alone trains: the value head and, in `adapter` mode, the critic adapter."""
        own = [p for n, p in self.lm.named_parameters() if f".{CRITIC_ADAPTER}." in n] \
            if self.critic_mode == "adapter" else []
        return [*own, *self.v_head.parameters()]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def build_policy(cfg: PolicyConfig, model_path: str, kind: str, device: torch.device, dtype: torch.dtype,
                 reference_shared: bool, seed: int, critic: Optional[CriticConfig] = None) -> PolicyWithValue:
    """Base model + (starting adapter loaded trainable | fresh LoRA) [+ critic adapter] + value head. Seeded for
    reproducible init."""
    from peft import LoraConfig as PeftLoraConfig, PeftModel, TaskType, get_peft_model

    base = load_base_model(model_path, kind, dtype, cfg.revision, cfg.trust_remote_code, cfg.quantization, device)
    if cfg.quantization:
        from peft import prepare_model_for_kbit_training

        # norms and other small weights to float32, input grads on (LoRA behind frozen quantized layers)
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        # non-reentrant: gradients reach the LoRA weights inside a block although its inputs need none
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed)
    has_ref_adapter = False
    if cfg.adapter:
        adapter = Path(cfg.adapter)
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(f"policy.adapter: {adapter} is not a PEFT adapter folder (no adapter_config.json)")
        lm = PeftModel.from_pretrained(base, str(adapter), adapter_name=TRAINABLE_ADAPTER, is_trainable=True)
        if reference_shared:
            # The reference is base + the SFT adapter as it was at the start: a second, frozen copy of it.
            lm.load_adapter(str(adapter), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            lm.set_adapter(TRAINABLE_ADAPTER)
            has_ref_adapter = True
    else:
        lcfg: LoraConfig = cfg.lora
        task = TaskType.SEQ_2_SEQ_LM if kind == "seq2seq" else TaskType.CAUSAL_LM
        lm = get_peft_model(base, PeftLoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                                                 target_modules=list(lcfg.target_modules), task_type=task))
    if critic is not None and critic.mode == "adapter":
        lm.add_adapter(CRITIC_ADAPTER, _critic_lora_config(critic, cfg, lm, kind))
        for n, p in lm.named_parameters():  # PEFT adds it frozen (inactive); it trains alongside the policy's
            if f".{CRITIC_ADAPTER}." in n:
                p.requires_grad_(True)
    _disable_dropout(lm)
    policy = PolicyWithValue(lm, kind, cfg.value_head_init_std, has_ref_adapter,
                             critic.mode if critic is not None else "shared")
    if cfg.quantization:
        policy.v_head.to(device)  # bitsandbytes placed the base already; quantized weights refuse .to()
    else:
        policy.to(device)
    policy.eval()  # dropout off for sampling AND for the PPO forward passes
    if cfg.gradient_checkpointing:
        checkpoint_in_eval(policy)
    return policy


def _critic_lora_config(critic: CriticConfig, cfg: PolicyConfig, lm: nn.Module, kind: str):
    """The critic adapter's LoRA config: `critic.lora`, else `policy.lora`, else the starting adapter's."""
    from peft import LoraConfig as PeftLoraConfig, TaskType

    task = TaskType.SEQ_2_SEQ_LM if kind == "seq2seq" else TaskType.CAUSAL_LM
    if critic.lora is None and cfg.adapter:
        start = lm.peft_config[TRAINABLE_ADAPTER]
        r, alpha, targets = start.r, start.lora_alpha, sorted(start.target_modules)
    else:
        lcfg = critic.lora or cfg.lora
        r, alpha, targets = lcfg.r, lcfg.alpha, list(lcfg.target_modules)
    return PeftLoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, task_type=task)


def checkpoint_in_eval(model: nn.Module) -> int:
    """Make gradient checkpointing work while the model stays in eval mode (dropout off).

    transformers recomputes a block only when the block's own `training` flag is set. Setting that flag on the
    checkpointed blocks alone (not on their children: attention, MLP, dropout and their `if self.training`
    branches stay in eval mode) turns recomputation on without changing the function. Generation is unaffected:
    without gradients a block runs as is, cache included. Returns the number of blocks."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not blocks:
        raise ValueError("policy.gradient_checkpointing: this model has no checkpointable blocks in transformers "
                         f"{__import__('transformers').__version__}; turn it off")
    for m in blocks:
        m.training = True
    return len(blocks)


class FrozenReference(nn.Module):
    """A separate frozen copy of the starting policy (base, or base + starting adapter merged) on its own device."""

    def __init__(self, lm: nn.Module, kind: str) -> None:
        super().__init__()
        self.lm = lm.eval().requires_grad_(False)
        self.kind = kind

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device


def build_reference_copy(policy_cfg: PolicyConfig, ref_cfg: ReferenceConfig, model_path: str, kind: str,
                         device: torch.device, dtype: torch.dtype) -> FrozenReference:
    from peft import PeftModel

    q = policy_cfg.quantization
    base = load_base_model(model_path, kind, dtype, policy_cfg.revision, policy_cfg.trust_remote_code, q, device)
    if policy_cfg.adapter:
        base = PeftModel.from_pretrained(base, policy_cfg.adapter)
        if not q:  # merging into quantized weights would round them; keep the adapter as a frozen side path there
            base = base.merge_and_unload()
    reference = FrozenReference(base, kind)
    return reference if q else reference.to(device)


def reference_logprobs(policy: PolicyWithValue, reference: Optional[FrozenReference], prompt_ids, prompt_mask,
                       response_ids, temperature: float, forward: Optional[nn.Module] = None,
                       group: int = 1) -> torch.Tensor:
    """Log-probs (B, T) of the responses under the frozen starting policy, returned on the policy's device.

    `forward` is what to call for the shared reference: the prepared policy (DeepSpeed engine: ZeRO-3 gathers the
    sharded weights in its hooks; accelerate's mixed-precision autocast, as for the policy's own log-probs), or
    `policy` itself (the default). `group`: responses per prompt, in groups of consecutive rows (seq2seq encodes
    each prompt once)."""
    out_device = response_ids.device
    if reference is None:
        # no_grad, not inference_mode: weights that ZeRO-3 gathers in here must stay usable by autograd later
        with torch.no_grad(), policy.reference_mode():
            logits, _ = (forward or policy)(prompt_ids, prompt_mask, response_ids, want_values=False, group=group)
            return logprobs_from_logits(logits, response_ids, temperature).float().to(out_device)
    with torch.inference_mode():
        dev = reference.device
        logits, _ = lm_forward(reference.lm, reference.kind, prompt_ids.to(dev), prompt_mask.to(dev),
                               response_ids.to(dev), False, group)
        return logprobs_from_logits(logits, response_ids.to(logits.device), temperature).float().to(out_device)


# --------------------------------------------------------------------------------------------------------------
# Rollout generation
# --------------------------------------------------------------------------------------------------------------
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
