"""The policy (base + LoRA + value head), the frozen reference and its log-probs (batched rollout generation is
train/rollout.py)."""

from __future__ import annotations

import contextlib
import inspect
import logging
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedTokenizerBase

from detoxrl.train.config import CriticConfig, LoraConfig, PolicyConfig, ReferenceConfig
from detoxrl.train.errors import InputError, InputNotFoundError, loading_model
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


def kind_of(config) -> str:
    """`seq2seq` or `causal`, from a model config."""
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def detect_kind(model_path: str, kind: str, revision: Optional[str] = None, trust_remote_code: bool = False) -> str:
    if kind != "auto":
        return kind
    with loading_model(model_path, revision=revision):
        cfg = AutoConfig.from_pretrained(model_path, revision=revision, trust_remote_code=trust_remote_code)
    return kind_of(cfg)


def load_tokenizer(model_path: str, kind: str, revision: Optional[str] = None,
                   trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    with loading_model(model_path, revision=revision):
        tok = AutoTokenizer.from_pretrained(model_path, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise InputError(f"tokenizer of {model_path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token  # GPT-2 style: pad with EOS; the response mask handles it
    tok.padding_side = "left" if kind == "causal" else "right"
    if tok.eos_token_id is None:
        raise InputError(f"tokenizer of {model_path} has no eos token; responses could never end")
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
    with loading_model(path, revision=revision):
        model = _auto_model_class(kind).from_pretrained(path, dtype=dtype, revision=revision,
                                                        trust_remote_code=trust_remote_code, **extra)
    _disable_dropout(model)
    return model


def lm_forward(lm: nn.Module, kind: str, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
               response_ids: torch.Tensor, want_hidden: bool, group: int = 1, want_logits: bool = True,
               encoder_states: Optional[torch.Tensor] = None) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Logits (B, T, V) predicting each response token and, if asked, the last hidden state at those positions.

    `group` > 1 (seq2seq): rows come in groups of `group` responses to the same prompt; the encoder runs once per
    prompt and its outputs are expanded (for the passes without gradients; a gradient pass keeps one row per
    prompt copy). `want_logits=False` (causal) computes the logits of one position only (for a critic's hidden
    states); logits are then None. `encoder_states` (seq2seq, (B, P, d)): the encoder's output for these rows,
    computed earlier by this very model (rollout), so the encoder does not run again."""
    if kind == "seq2seq":
        start = lm.config.decoder_start_token_id
        dec_in = torch.cat([torch.full_like(response_ids[:, :1], start), response_ids[:, :-1]], dim=1)
        inputs = {"input_ids": prompt_ids}
        if encoder_states is not None:
            inputs = {"encoder_outputs": (encoder_states,)}
        elif group > 1:
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
        self._lm_forward = lm_forward  # or its torch.compile'd twin (compile_forward)

    def compile_forward(self, backend: str = "inductor") -> None:
        """ppo.compile: the forward passes of the PPO step (old log-probs and values, the shared reference, the
        update; not generate()) run through torch.compile. Dynamo guards on the model, the adapter flags and the
        shapes, so the reference and critic adapters get graphs of their own. (`backend`: tests trace with
        "aot_eager", Dynamo and AOTAutograd without inductor's code generation.)"""
        self._lm_forward = torch.compile(lm_forward, backend=backend)

    def forward(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
                want_values: bool = True, group: int = 1, encoder_states: Optional[torch.Tensor] = None,
                want_logits: bool = True) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Logits (B, T, V) predicting each response token, and values (B, T) of the state before it (None unless
        `want_values`). `group`, `encoder_states`: see `lm_forward` (passes without gradients only; the states are
        the policy adapter's, so the critic adapter's pass encodes afresh). `want_logits=False` with the adapter
        critic: its pass alone (logits None)."""
        separate = self.critic_mode == "adapter"
        logits = hidden = None
        if want_logits or not separate:
            # the policy's pass runs with whatever is active: the policy adapter, or the reference in reference_mode
            logits, hidden = self._lm_forward(self.lm, self.kind, prompt_ids, prompt_mask, response_ids,
                                              want_values and not separate, group, encoder_states=encoder_states)
        values = None
        if want_values:
            if separate:
                with active_adapter(self.lm, CRITIC_ADAPTER):
                    _, hidden = self._lm_forward(self.lm, self.kind, prompt_ids, prompt_mask, response_ids, True,
                                                 group, want_logits=False)
            elif self.critic_mode == "detached":  # the value loss then trains the head only, never the LoRA layers
                hidden = hidden.detach()
            values = self.value_of(hidden)
        return logits, values

    def value_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """The value head on last hidden states (..., d) -> (...) float32."""
        # the head is float32, except under DeepSpeed bf16/fp16, which casts the whole module
        return self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1).float()

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
            raise InputNotFoundError(f"policy.adapter: {adapter} is not a PEFT adapter folder (no adapter_config.json)")
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

    @property
    def dtype(self) -> torch.dtype:
        return next(self.lm.parameters()).dtype


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
