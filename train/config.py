"""Run configuration: typed dataclasses, loaded as defaults < YAML file < `section.key=value` overrides.

Every field has a docstring (the attribute docstring under it); `docs/CONFIG.md` is generated from them
(`python -m detoxrl.train.config --markdown`). Parsing and type checking are OmegaConf's structured configs;
unknown keys fail with the closest valid key; `validate()` then refuses impossible combinations before any
model is loaded, naming the key.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from detoxrl.train.devices import DEVICE_RE


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key."""


# --------------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    output_dir: str = "runs/demo"
    """Folder for everything the run writes: tensorboard/, checkpoints/, final/, config.yaml, metrics.jsonl, run_info.json."""
    seed: int = 0
    """Seed for data order, sampling, and initialisation of LoRA and the value head (identical on all ranks)."""
    total_steps: int = 40
    """Number of PPO iterations (rollout + update) to run."""
    device: str = "auto"
    """Policy device for a single process: `auto` (what accelerate picks: the rank's GPU, else CPU), `cpu`. Under
    `accelerate launch` each rank trains on its own device."""
    cpu_threads: Optional[int] = None
    """Torch CPU threads per process (null = torch's default). Tiny models run faster with 1, and processes sharing
    a machine's cores must not oversubscribe them (2 threads on a busy 2-core machine were 20x slower here)."""
    max_nonfinite_steps: int = 3
    """A step whose loss is NaN/inf skips its update and is logged; this many such steps in a row stop the run."""


@dataclass
class LoraConfig:
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """LoRA dropout probability. Note: detoxrl keeps every module in eval mode during PPO (dropout off), as the
    PPO log-probabilities must match those of sampling; the value is kept for the saved adapter's config."""
    target_modules: list[str] = field(default_factory=lambda: ["q", "v"])
    """Module names to adapt (`["q","v"]` for T5, `["c_attn"]` for GPT-2)."""


@dataclass
class PolicyConfig:
    model: str = "demo"
    """Hub name or local folder of the base model. `demo` builds the offline demo's tiny T5 (cached)."""
    kind: Literal["auto", "seq2seq", "causal"] = "auto"
    """`seq2seq` (T5, BART) or `causal` (GPT-2, Llama); `auto` reads `is_encoder_decoder` from the model config."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype: `auto` is float32 on CPU and bfloat16 on a GPU that supports it."""
    adapter: Optional[str] = None
    """Optional starting LoRA adapter (PEFT folder), loaded TRAINABLE, as the seeds load their SFT adapter. When
    set, `lora` is ignored and the reference is base + this adapter."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Fresh LoRA settings, used when `adapter` is not set."""
    value_head_init_std: float = 0.0
    """Std of the value head's initial weights (0 = zero init: initial values are 0)."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) of the model."""
    trust_remote_code: bool = False
    """Allow model code from the hub. Off unless you trust the repository."""
    gradient_checkpointing: bool = False
    """Recompute the activations of each transformer block in the backward pass instead of keeping them (less memory,
    about one more forward pass of time). Works with dropout off: the blocks run in training mode only for this."""
    quantization: Optional[Literal["8bit", "4bit"]] = None
    """Load the frozen base weights (policy and reference copy) in 8-bit or 4-bit NF4 with bitsandbytes, LoRA and the
    value head on top in full precision. GPU only (`pip install bitsandbytes`); not with DeepSpeed ZeRO-3."""


@dataclass
class ReferenceConfig:
    mode: Literal["shared", "copy"] = "shared"
    """`shared`: no second copy of the base; the reference is the policy with its trainable adapter switched off
    (or, when starting from an SFT adapter, a frozen second copy of that adapter on the same base). `copy`: a
    separate frozen model (base + starting adapter merged) on `device`."""
    device: str = "auto"
    """For `copy`: `auto` (a GPU no training rank uses, if any: the first after the training ranks; else the
    rank's own device), `cpu`, or `cuda:N`. Runs under inference mode in the policy's dtype."""
    placement: Literal["local", "scorer"] = "local"
    """For `copy`: `local` (every training rank holds its own copy on `device`) or `scorer` (one scorer process per
    machine holds ONE copy on `device` and computes the log-probs of every local rank's responses while the ranks
    compute their old log-probs and values; see `scorer` and docs/ARCHITECTURE.md, "Scorers")."""


@dataclass
class RewardTermConfig:
    model: str = "demo"
    """Hub name or local folder of a sequence-classification model. `demo` = the demo's tiny toxicity classifier."""
    label: str = "nothate"
    """Output label by NAME, checked against the model's `id2label` (e.g. `nothate`, `LABEL_1`, `POSITIVE`)."""
    output: Literal["logit", "probability"] = "logit"
    """Use the label's raw logit or its softmax probability."""
    weight: float = 1.0
    """Weight of this term in the total reward (total = sum of weight * term)."""
    device: str = "auto"
    """Device of this classifier: `auto` (a GPU no training rank uses, if any: the first after the training ranks;
    else the rank's own device), `cpu`, or `cuda:N`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Classifier weights dtype: `auto` is the policy's dtype on a GPU and float32 on the CPU."""
    batch_size: int = 32
    """Texts per forward pass (texts are sorted by length first to limit padding)."""
    max_length: Optional[int] = None
    """Max tokens fed to the classifier; default = its tokenizer's `model_max_length` (capped at its position table)."""
    score: Literal["response", "prompt_response"] = "response"
    """What is scored: the response alone, or prompt + response with the prompt cut from the LEFT so the response
    is never truncated away."""
    tokenizer: Optional[str] = None
    """Tokenizer to use if it differs from `model`."""
    trust_remote_code: bool = False
    """Allow model code from the hub."""


@dataclass
class RewardConfig:
    terms: list[RewardTermConfig] = field(default_factory=lambda: [RewardTermConfig()])
    """One or more classifier terms; the reward is their weighted sum."""
    normalize: bool = False
    """Running normalisation of the total score (statistics over all ranks, saved in checkpoints): to mean 0, std 1,
    or, with `normalize_shift_mean: false`, divided by the running std only."""
    normalize_shift_mean: bool = True
    """With `normalize`: subtract the running mean too (standardisation). False scales by the running std only: the
    score keeps its sign and its zero, so the balance with the KL penalty (which is not shifted) moves only by the
    scale, not by a drifting offset."""
    clip: Optional[float] = None
    """Clip the (normalised) score to [-clip, clip]."""
    placement: Literal["local", "scorer"] = "local"
    """`local`: every training rank holds its own copy of each classifier on the term's `device` and scores its own
    responses. `scorer`: one scorer process per device per machine holds ONE copy of the terms placed there and
    scores the responses of every training rank of the machine in shared batches, while the ranks compute their
    old log-probs and values (see `scorer`). Judges stay on the training ranks' own devices."""


@dataclass
class ScorerConfig:
    """Scorer processes (`reward.placement: scorer`, `reference.placement: scorer`): started by each machine's first
    training rank, one per device (the CPU counts as one device per model), stopped with the run."""
    timeout: float = 300.0
    """Seconds a training rank waits for a scorer's answer; a scorer that dies or stays silent longer stops every
    rank with an error naming it, after a checkpoint of the last finished step. Keep it below the training process
    group's timeout (30 min by default), which the other machines' ranks wait under meanwhile."""
    start_timeout: float = 600.0
    """Seconds to wait for the scorers to load their models and connect."""
    batching: Literal["packed", "per_rank"] = "packed"
    """Reward scoring on a scorer: `packed` sorts the texts of all local ranks by length and scores them in shared
    batches of up to `max_batch_tokens` padded tokens (one forward serves several ranks); `per_rank` scores each
    rank's texts exactly as `local` placement does (`reward.terms.N.batch_size`), so the scores are bitwise those of
    `local` (kernels give batch-size-dependent roundings: `packed` agrees to ~1e-6). The reference copy likewise:
    `packed` re-pads the ranks' requests to one shape and runs them together, `per_rank` one forward per rank."""
    max_batch_tokens: int = 16384
    """`packed`: padded tokens per forward pass (reward: texts x longest text; reference: rows x (prompt + response
    length))."""
    cpu_threads: Optional[int] = None
    """Torch CPU threads of each scorer process (null = `run.cpu_threads`, else torch's default)."""


@dataclass
class DataConfig:
    dataset: str = "demo"
    """Where prompts come from: a hub dataset name; a `save_to_disk` folder; a folder with `<split>.jsonl|.csv|.parquet`;
    or one local .jsonl/.json/.csv/.parquet file. `demo` = the shipped demo dialogues."""
    split: str = "train"
    """Split used for training prompts."""
    text_field: str = "dialogue"
    """Column with the text inserted into the template (also used by `min_text_chars`)."""
    template: str = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:\n"
    """Prompt template; `{column}` placeholders are filled from the row. `{}`-free templates use the text as is."""
    max_prompt_tokens: int = 512
    """Prompts longer than this (in policy tokens) are truncated (from the left for causal models, keeping the
    end of the prompt next to the response; from the right for seq2seq, keeping EOS). Never padded to it."""
    min_text_chars: int = 0
    """Drop rows whose `text_field` is shorter than this many characters (the IMDb recipe uses 200)."""
    prompt_tokens_range: Optional[list[int]] = None
    """`[lo, hi]`: cut each prompt to a length drawn uniformly from lo..hi tokens (the IMDb recipe's 2-8)."""
    max_samples: Optional[int] = None
    """Use only the first N rows (after filtering)."""
    reference_field: Optional[str] = None
    """Column with reference outputs (e.g. `summary`), used by evaluation (ROUGE)."""


@dataclass
class GenerationConfig:
    do_sample: bool = True
    """Sample (True) or greedy decode (False)."""
    top_k: int = 0
    """Top-k filtering (0 = off)."""
    top_p: float = 1.0
    """Nucleus filtering (1.0 = off)."""
    temperature: float = 1.0
    """Sampling temperature; the same temperature divides the logits for the PPO log-probabilities."""
    min_new_tokens: int = 1
    """Minimum response tokens (EOS suppressed before). Counts new tokens only, unlike `min_length`."""
    max_new_tokens: int = 32
    """Maximum response tokens (used when `max_new_tokens_range` is not set)."""
    max_new_tokens_range: Optional[list[int]] = None
    """`[lo, hi]`: draw the maximum response length per rollout batch uniformly from lo..hi (the seeds' 100..400)."""
    rollout_batch_size: int = 64
    """Prompts per `generate()` call (chunks the step's batch to bound memory); each prompt yields `ppo.k` responses,
    and the gradient-free forward passes take the same chunks."""
    engine: Literal["hf", "static"] = "hf"
    """Rollout sampler (train/rollout.py; both are transformers' generate() with the same sampling semantics):
    `hf` the dynamic KV cache, eager; `static` a preallocated StaticCache (seq2seq: EncoderDecoderCache) whose fixed
    shapes let the decode step be compiled (`compile`). Falls back to `hf`, with one logged reason, for models
    without static-cache support and for ZeRO-3 sharded generation (`zero3_gather_weights: false`)."""
    compile: Literal["auto", "always", "never"] = "auto"
    """With `engine: static`: torch.compile the decode step (CUDA graphs on GPUs). `auto` compiles on CUDA devices
    only: on CPUs a compile costs tens of seconds per shape, more than short runs win; `always` compiles on CPUs
    too; `never` runs the static cache eager."""
    static_pad_multiple: int = 64
    """With `engine: static`: generate() sees prompts padded (masked) to a multiple of this many tokens and a cache
    sized to a multiple of it, so few shapes reach the compiled step (each new shape compiles once)."""
    zero3_gather_weights: bool = True
    """Under DeepSpeed ZeRO-3: gather the full policy on every rank once per rollout (fast; the whole model must fit
    on one GPU for the duration). False: generate on the sharded model with `synced_gpus` (parameters fetched layer
    by layer for every token: slow, least memory)."""


@dataclass
class KLConfig:
    init_coef: float = 0.2
    """Initial KL penalty coefficient beta."""
    adaptive: bool = True
    """Adaptive controller (Ziegler et al.) steering KL to `target`; False keeps beta fixed."""
    target: float = 3.0
    """Target KL (nats per response) for the adaptive controller (the learning benchmark's runs at lr 3e-4 end near
    1 nat with it; the seeds' 6 lets a LoRA policy at a higher lr drift further)."""
    horizon: int = 10000
    """Adaptive controller horizon in samples."""
    estimator: Literal["k1", "k2", "k3", "abs"] = "k1"
    """Per-token KL estimator: k1 = logp - logp_ref; k2 = (logp - logp_ref)^2 / 2; k3 = exp(ref - logp) - 1 -
    (ref - logp), unbiased and >= 0; abs = |logp - logp_ref|."""
    mode: Literal["reward", "loss"] = "reward"
    """Where the KL acts: `reward` subtracts coef x KL from every token's reward (the principled reverse-KL penalty;
    k1 is the usual estimator); `loss` leaves the rewards alone and adds coef x KL of the CURRENT policy to the loss,
    aggregated like the policy loss (GRPO's choice; needs `estimator` k2, whose gradient matches the KL's on-policy,
    or k3, biased but always >= 0)."""


@dataclass
class PPOConfig:
    batch_size: int = 16
    """Responses per PPO step PER PROCESS; the global batch is batch_size x number of processes. With `k` samples per
    prompt a process takes batch_size / k prompts per step (all k responses of a prompt on the same process)."""
    mini_batch_size: int = 4
    """Responses per optimizer step (per process); mini-batches are drawn from the step's shuffled responses."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per mini-batch (mini_batch_size must be divisible by it)."""
    compile: bool = False
    """Run the policy's forward passes of the PPO step (old log-probs and values, the shared reference's log-probs,
    the update's forward and backward; not sampling, see generation.compile) and the update's loss maths through
    `torch.compile` (inductor). It pays where Python and kernel-launch overhead dominate, small models over many
    steps: on the CPU the tiny T5 preset's update took 0.078 s eager, 0.048-0.057 s with the passes compiled and
    0.041-0.049 s with the loss maths compiled too (benchmarks/RESULTS.md). The first steps pay the compile (tens of seconds on a
    CPU) and new shapes a recompile, so short runs lose. Not under DeepSpeed ZeRO-3 or with policy.quantization
    (the run then stays eager and logs why); a reference copy (reference.mode: copy) stays eager."""
    rollout_logprobs: bool = False
    """Take the old log-probs (and the shared or detached critic's values) from the sampling pass: generate() hands
    back each step's logits and last hidden state, so the PPO step runs no old-log-prob forward pass of its own
    (critic.mode=adapter still runs its critic adapter's pass for the values). The same model computed them on the
    same weights, so they equal the recomputed ones up to float rounding: incremental decoding and the teacher-forced
    pass add up in different orders (float32: about 1e-6 apart; bf16 further, so the first mini-batch's ratio is
    not exactly 1). Memory: a rollout chunk's logits (generation.rollout_batch_size x k x new tokens x vocabulary
    floats) are held until its generate() returns. False (the default): recomputed, bitwise-reproducible across
    generation chunk sizes and process counts."""
    bucket_by_length: bool = True
    """Length buckets: each mini-batch's rows are sorted by length before they are cut into micro-batches, and every
    micro-batch (and every chunk of the gradient-free reference and old-log-prob passes, whose rows are sorted the
    same way) drops the padding columns none of its rows uses. The losses stay token means over the global
    mini-batch, so only padding work changes (and float rounding). False: shuffled order, every pass padded to the
    step's longest prompt and response."""
    ppo_epochs: int = 2
    """Passes over the step's rollouts (2 with `optim.lr` 3e-4 met the learning benchmark's KL budget; the seeds' 4
    at that lr moves further from the reference per step)."""
    kl: KLConfig = field(default_factory=KLConfig)
    """KL penalty against the reference."""
    estimator: Literal["gae", "rloo", "grpo", "reinforce_pp"] = "gae"
    """Advantage estimator. `gae`: a critic (see `critic`) and GAE. Critic-free (no value loss, no critic trained):
    `rloo`: each response's total reward minus the mean of the other k-1 responses to the same prompt; `grpo`: minus
    the group mean, divided by the group std (`group_std_scale`); `reinforce_pp` (REINFORCE++): per-token
    reward-to-go, normalised over the global batch (all ranks). `rloo` and `grpo` need k >= 2."""
    k: int = 1
    """Responses sampled per prompt (a group). The k responses of a prompt are sampled on one process: for seq2seq
    the prompt is encoded once and the encoder outputs expanded k times (generation and the gradient-free passes)."""
    group_std_scale: bool = True
    """`grpo`: divide by the group's std (+1e-4). False = Dr. GRPO's advantages (mean-centred only, no difficulty
    bias); pair it with `loss_aggregation: token_sum_norm` for the full Dr. GRPO loss."""
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "token_sum_norm"] = "token_mean"
    """How per-token losses become a mini-batch loss (policy, value, entropy and KL-loss terms alike), always over the
    GLOBAL mini-batch (all ranks and micro-batches): `token_mean` (sum / tokens; no length bias per token),
    `seq_mean_token_mean` (mean over responses of each response's token mean: GRPO's original, short responses
    weigh more per token), `token_sum_norm` (sum / (responses x `loss_norm_constant`): Dr. GRPO, unbiased in length)."""
    loss_norm_constant: Optional[int] = None
    """The constant of `token_sum_norm` (tokens per response); null = the largest generation budget
    (`generation.max_new_tokens` or the top of `max_new_tokens_range`)."""
    gamma: float = 1.0
    """Discount (GAE and `reinforce_pp`'s reward-to-go)."""
    lam: float = 0.95
    """GAE lambda of the policy's advantages (`critic.lam` can set the critic's returns apart)."""
    clip_range: float = 0.2
    """Policy ratio clip epsilon."""
    vf_coef: float = 0.1
    """Value-loss coefficient (`gae` only)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient (0 = off: entropy is still logged, computed without gradients). The entropy is that
    of the tempered distribution the responses were sampled from."""
    whiten_advantages: bool = True
    """Whiten advantages over the global (all-rank) batch, for `gae` and `rloo`. `grpo` uses its group statistics
    instead and `reinforce_pp` is always normalised over the global batch."""
    max_grad_norm: Optional[float] = 1.0
    """Gradient clipping norm (null = off)."""
    ratio_threshold: float = 10.0
    """Skip a mini-batch whose mean probability ratio exceeds this (a sign of a broken update)."""
    missing_eos_penalty: Optional[float] = None
    """Subtract this from the score of responses that hit the length limit without EOS."""


@dataclass
class CriticConfig:
    mode: Literal["shared", "detached", "adapter"] = "detached"
    """The value model of `ppo.estimator: gae`. `shared`: a value head on the policy's last hidden states, its loss
    training the policy's LoRA too. `detached`: the same head on detached hidden states (the value loss trains the
    head only, never the LoRA the policy uses). `adapter`: a second LoRA adapter (`lora`) with its own value head on
    the SAME frozen base (policy adapter, critic adapter and the adapter-off reference share one copy of the base
    weights): a separate critic, one extra forward pass per micro-batch. `detached` is the default: in the learning
    benchmark it gained as much reward as `shared` at a lower KL, and it cannot pull the policy's LoRA off course."""
    lr: Optional[float] = None
    """Learning rate of the critic's parameters (value head, and the critic adapter in `adapter` mode), a parameter
    group of its own that follows the same schedule; null = `optim.lr`."""
    lora: Optional[LoraConfig] = None
    """`adapter` mode: the critic adapter's LoRA settings; null = `policy.lora` (when the policy starts from
    `policy.adapter`, that adapter's rank, alpha and target modules)."""
    warmup_steps: int = 0
    """PPO steps at the start that train only the critic (value head and, in `adapter` mode, its adapter); the policy
    starts moving after them. The policy's parameters take no optimizer step meanwhile (under DeepSpeed they take
    steps of learning rate 0). Counts toward `run.total_steps`."""
    lam: Optional[float] = None
    """GAE lambda of the critic's returns (targets), decoupled from `ppo.lam` of the policy's advantages (VC-PPO:
    1.0, unbiased returns for the critic, a smaller lambda for the policy); null = `ppo.lam`."""
    value_clip: Literal["absolute", "relative", "none"] = "absolute"
    """Clip the new values around the old ones: `absolute` by +-`value_clip_range`; `relative` by +-`value_clip_range`
    x the std of the step's returns (over all ranks), so the critic moves the same share of the return scale whatever
    the reward's units; `none` (no clipping; `none`, not `off`, which YAML reads as false)."""
    value_clip_range: float = 0.2
    """The clip range of `value_clip`."""


@dataclass
class OptimConfig:
    lr: float = 3e-4
    """AdamW learning rate. 3e-4 suits a LoRA policy (benchmarks/RESULTS.md, learning benchmark): TRL's full
    fine-tuning default 1.41e-5, which the seeds used, leaves a LoRA policy where it started in 60 steps, and 1e-3
    overshoots a KL budget of 3 nats."""
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warmup (decays over the total number of optimizer steps)."""
    warmup_steps: int = 0
    """Linear warmup in optimizer steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""


@dataclass
class LoggingConfig:
    log_every: int = 1
    """Write scalars (TensorBoard, metrics.jsonl, console) every N steps."""
    sample_every: int = 10
    """Every N steps (0 = never), write (prompt, reference, response, reward, reward terms, judge scores) rows to
    samples.jsonl in the run folder and a text table of them to TensorBoard."""
    num_samples: int = 4
    """Rows per sampled step (the first responses of the main process's batch)."""
    tensorboard: bool = True
    """Write TensorBoard event files under output_dir/tensorboard."""
    progress_bar: bool = True
    """Show a console progress bar (rank 0 only)."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Save a checkpoint every N steps and at the end (0 = none; the final adapter is saved anyway). A stop signal
    (SIGTERM, SIGINT, SIGUSR1) always writes one; so does a failed scorer, and with scorers the last step's is
    written before the held-out evaluation after training (a scorer failing there then costs only the evaluation)."""
    resume: str = "auto"
    """`auto` (newest complete checkpoint in output_dir, if any), `never`, or a checkpoint path."""
    keep_last: int = 2
    """Keep the N newest checkpoints; older ones are pruned."""
    allow_config_change: bool = False
    """Resume even if keys that alter the maths (batch size, model, reward, ...) differ from the checkpoint's."""


@dataclass
class EvaluationConfig:
    before_after: bool = False
    """Generate for held-out prompts before and after training and print the mean toxicity of each."""
    split: str = "test"
    """Data split of the held-out prompts."""
    num_samples: int = 32
    """Held-out prompts (the first N usable rows of `split`)."""
    samples_per_prompt: int = 1
    """Responses sampled per held-out prompt, each from its own seeded chunk: more draws narrow the interval of a
    small prompt set (the demo: 40 prompts x 8). detoxrl-eval takes the same default, so both print the same."""
    term: int = 0
    """Index of the reward term whose classifier measures toxicity."""
    toxic_label: str = "hate"
    """Label whose probability is the toxicity."""


@dataclass
class JudgeConfig:
    model: str = "demo"
    """Hub name or local folder of a sequence classifier that grades the responses independently of the reward
    (never trained against). `demo` = the demo's judge: a tiny DistilBERT with its own WordPiece tokenizer,
    trained on other sentences than the demo's reward model."""
    label: str = "toxic"
    """Label whose probability is the judge's toxicity, by NAME (checked against the model's `id2label`)."""
    name: Optional[str] = None
    """Short name in metrics, TensorBoard tags and reports (default: `model`)."""
    threshold: float = 0.5
    """A response counts as toxic for this judge when P(label) >= threshold (disagreement shares, report flags)."""
    tokenizer: Optional[str] = None
    """Tokenizer to use if it differs from `model`."""
    batch_size: int = 32
    """Texts per forward pass."""
    max_length: Optional[int] = None
    """Max tokens fed to the judge; default = its tokenizer's `model_max_length` (capped at its position table)."""
    trust_remote_code: bool = False
    """Allow model code from the hub."""


@dataclass
class AlarmsConfig:
    """Reward-hacking alarms computed from each step's metrics (docs/alarms.md: what each one catches)."""
    enabled: bool = True
    """Compute the alarm signals, log them (`alarm/*` in TensorBoard and metrics.jsonl) and warn when one fires."""
    action: Literal["warn", "stop"] = "warn"
    """`warn`: a console warning and a TensorBoard scalar. `stop`: also write a checkpoint and end the run
    (exit status 76, cli.EXIT_ALARM)."""
    baseline_steps: int = 3
    """The mean of the first N steps is each signal's starting value; no alarm fires during them, and "recent"
    means (over the last `window` steps) leave them out."""
    patience: int = 2
    """An alarm fires once its condition has held on this many consecutive steps."""
    window: int = 5
    """Steps over which recent values are averaged and the KL trend is fitted (least squares)."""
    entropy_drop: Optional[float] = 0.5
    """Fire when the policy entropy (mean of the last `window` steps) is below (1 - this) x its start. Every
    threshold can be null: that alarm is off."""
    short_share: Optional[float] = 0.3
    """Fire when more than this share of the responses (mean of the last `window` steps) is empty or no longer than
    generation.min_new_tokens, and at least 0.1 more than at the start."""
    repetition: Optional[float] = 0.25
    """Fire when the within-response repetition (share of a response's word bigrams that repeat an earlier bigram
    of the same response; mean over responses and the last `window` steps) exceeds this."""
    length_drift: Optional[float] = 0.3
    """Fire when the mean response length (last `window` steps) differs from its start by more than this fraction,
    up or down."""
    kl_growth: Optional[float] = 1.0
    """Fire when KL (nats per response) grows faster than this many nats per step (least-squares slope over the
    last `window` steps) while its mean over those steps is above `kl_floor`."""
    kl_floor: float = 3.0
    """Mean KL (nats, last `window` steps) below which the KL-growth and reward-per-KL alarms stay quiet."""
    reward_per_kl: Optional[float] = 0.15
    """Fire when the reward gained since the start per nat of KL falls below this while KL is above `kl_floor`:
    the policy pays in distance from the reference for little reward."""
    judge_disagreement: Optional[float] = 0.25
    """Fire when more than this share of the responses (mean of the last `window` steps) is called clean by the
    reward's toxicity classifier (evaluation.term, P(evaluation.toxic_label) < 0.5) but toxic by a judge, and at
    least 0.1 more than at the start (needs `judges`)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """Run identity and length."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """The trained model (LoRA + value head)."""
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    """The frozen starting policy for the KL penalty."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Frozen classifiers that score responses."""
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    """Scorer processes for reward models and the reference on dedicated devices."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Rollout sampling."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """PPO hyperparameters."""
    critic: CriticConfig = field(default_factory=CriticConfig)
    """The value model (for `ppo.estimator: gae`)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """TensorBoard, metrics.jsonl and console."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints and resume."""
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    """Before/after held-out evaluation during training."""
    judges: list[JudgeConfig] = field(default_factory=list)
    """Classifiers that grade toxicity independently of the reward: scored in the before/after evaluation, by
    `detoxrl-eval`, and on every step's responses (the judge-disagreement alarm, samples.jsonl)."""
    alarms: AlarmsConfig = field(default_factory=AlarmsConfig)
    """Reward-hacking alarms during training."""


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
def _omega_error(err: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    return ConfigError(f"{where}: {msg}" + (f" (key: {key})" if key else ""))


# Keys that existed in earlier versions: using one is an error that says what replaced it.
MOVED_KEYS = {
    "policy.value_head_detach": "critic.mode (value_head_detach: true is critic.mode: detached, false is "
                                "critic.mode: shared)",
    "ppo.value_clip_range": "critic.value_clip_range (with critic.value_clip: absolute | relative | none; null was "
                            "critic.value_clip: none)",
}


def _refuse_moved_keys(keys: list[str], where: str) -> None:
    for key in keys:
        if key in MOVED_KEYS:
            raise ConfigError(f"{where}: {key} was replaced by {MOVED_KEYS[key]}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults < YAML file < overrides (`section.key=value`, value parsed as YAML). Validated."""
    schema = OmegaConf.structured(Config)
    OmegaConf.set_struct(schema, True)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        _refuse_moved_keys([f"{sec}.{k}" for sec, sub in data.items() if isinstance(sub, dict) for k in sub],
                           str(path))
        try:
            schema = OmegaConf.merge(schema, OmegaConf.create(data))
        except OmegaConfBaseException as err:
            raise _omega_error(err, str(path)) from err
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        _refuse_moved_keys([key.strip()], f"override {item!r}")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from err
        try:
            OmegaConf.update(schema, key.strip(), value, merge=True)
        except OmegaConfBaseException as err:
            raise _omega_error(err, f"override {item!r}") from err
        except (TypeError, ValueError, IndexError) as err:  # e.g. a list index that does not exist
            raise ConfigError(f"override {item!r}: {err}") from err
    try:
        cfg = OmegaConf.to_object(schema)
    except OmegaConfBaseException as err:
        raise _omega_error(err, "config") from err
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return asdict(cfg)


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML; valid input for `--config` (round-trips)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True, width=120)


def config_hash(cfg: Config | dict) -> str:
    d = cfg if isinstance(cfg, dict) else to_dict(cfg)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _check_range(value: Optional[list], key: str, lo_min: int) -> None:
    if value is None:
        return
    _check(len(value) == 2, key, f"must be [lo, hi], got {value}")
    _check(lo_min <= value[0] <= value[1], key, f"needs {lo_min} <= lo <= hi, got {value}")


def validate(cfg: Config) -> None:
    """Refuse impossible combinations, naming the key. Runs before any model is loaded.

    Over 80 lines on purpose: a flat list of independent one-line checks in the config's order, which reads (and
    greps) better as one list than split across helpers."""
    r, p, g, o = cfg.run, cfg.ppo, cfg.generation, cfg.optim
    _check(r.total_steps >= 1, "run.total_steps", f"must be >= 1, got {r.total_steps}")
    _check(r.cpu_threads is None or r.cpu_threads >= 1, "run.cpu_threads", "must be >= 1 or null")
    _check(r.max_nonfinite_steps >= 1, "run.max_nonfinite_steps", "must be >= 1")
    _check(r.device == "auto" or r.device == "cpu" or r.device.startswith("cuda"), "run.device",
           f"must be auto, cpu or cuda[:N], got {r.device!r}")
    _check(cfg.policy.lora.r >= 1, "policy.lora.r", "must be >= 1")
    _check(0.0 <= cfg.policy.lora.dropout < 1.0, "policy.lora.dropout", "must be in [0, 1)")
    _check(len(cfg.policy.lora.target_modules) > 0, "policy.lora.target_modules", "must name at least one module")
    _check(p.batch_size >= 1, "ppo.batch_size", "must be >= 1")
    _check(cfg.generation.static_pad_multiple >= 1, "generation.static_pad_multiple", "must be >= 1")
    _check(p.mini_batch_size >= 1, "ppo.mini_batch_size", "must be >= 1")
    _check(p.mini_batch_size <= p.batch_size, "ppo.mini_batch_size",
           f"({p.mini_batch_size}) cannot be larger than ppo.batch_size ({p.batch_size})")
    _check(p.batch_size % p.mini_batch_size == 0, "ppo.batch_size",
           f"({p.batch_size}) must be divisible by ppo.mini_batch_size ({p.mini_batch_size})")
    _check(p.gradient_accumulation_steps >= 1 and p.mini_batch_size % p.gradient_accumulation_steps == 0,
           "ppo.gradient_accumulation_steps",
           f"({p.gradient_accumulation_steps}) must divide ppo.mini_batch_size ({p.mini_batch_size})")
    _check(p.ppo_epochs >= 1, "ppo.ppo_epochs", "must be >= 1")
    _check(p.k >= 1, "ppo.k", f"must be >= 1, got {p.k}")
    _check(p.batch_size % p.k == 0, "ppo.batch_size",
           f"({p.batch_size}) counts responses and must be divisible by ppo.k ({p.k}), the responses per prompt")
    _check(p.estimator not in ("rloo", "grpo") or p.k >= 2, "ppo.k",
           f"ppo.estimator={p.estimator} compares the responses to one prompt: needs ppo.k >= 2, got {p.k}")
    _check(p.loss_norm_constant is None or p.loss_norm_constant >= 1, "ppo.loss_norm_constant", "must be >= 1 or null")
    _check(0.0 < p.gamma <= 1.0, "ppo.gamma", "must be in (0, 1]")
    _check(0.0 <= p.lam <= 1.0, "ppo.lam", "must be in [0, 1]")
    _check(p.clip_range > 0, "ppo.clip_range", "must be > 0")
    _check(p.kl.mode == "reward" or p.kl.estimator in ("k2", "k3"), "ppo.kl.estimator",
           f"ppo.kl.mode=loss needs k2 or k3 (a k1 or abs loss has no useful gradient), got {p.kl.estimator}")
    _check(p.kl.init_coef >= 0, "ppo.kl.init_coef", "must be >= 0")
    _check(p.kl.target > 0 and p.kl.horizon > 0, "ppo.kl.target", "target and horizon must be > 0")
    _check(p.max_grad_norm is None or p.max_grad_norm > 0, "ppo.max_grad_norm", "must be > 0 or null")
    _check(p.ratio_threshold > 1.0, "ppo.ratio_threshold", "must be > 1")
    _check(o.lr > 0 and math.isfinite(o.lr), "optim.lr", f"must be a positive number, got {o.lr}")
    _check(len(o.adam_betas) == 2 and all(0 <= b < 1 for b in o.adam_betas), "optim.adam_betas",
           "must be two numbers in [0, 1)")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(g.top_k >= 0, "generation.top_k", "must be >= 0")
    _check(0.0 < g.top_p <= 1.0, "generation.top_p", "must be in (0, 1]")
    _check(g.temperature > 0, "generation.temperature", "must be > 0")
    _check(g.min_new_tokens >= 0, "generation.min_new_tokens", "must be >= 0")
    _check(g.max_new_tokens >= max(1, g.min_new_tokens), "generation.max_new_tokens",
           f"({g.max_new_tokens}) must be >= 1 and >= generation.min_new_tokens ({g.min_new_tokens})")
    _check_range(g.max_new_tokens_range, "generation.max_new_tokens_range", 1)
    if g.max_new_tokens_range is not None:
        _check(g.max_new_tokens_range[0] >= g.min_new_tokens, "generation.max_new_tokens_range",
               f"lower end must be >= generation.min_new_tokens ({g.min_new_tokens})")
    _check(g.rollout_batch_size >= 1, "generation.rollout_batch_size", "must be >= 1")
    d = cfg.data
    _check(d.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be >= 1")
    _check(d.min_text_chars >= 0, "data.min_text_chars", "must be >= 0")
    _check_range(d.prompt_tokens_range, "data.prompt_tokens_range", 1)
    _check(d.max_samples is None or d.max_samples >= 1, "data.max_samples", "must be >= 1 or null")
    rw = cfg.reward
    _check(len(rw.terms) >= 1, "reward.terms", "needs at least one term")
    for i, t in enumerate(rw.terms):
        _check(bool(t.model), f"reward.terms.{i}.model", "must name a model")
        _check(bool(t.label), f"reward.terms.{i}.label", "must name a label")
        _check(math.isfinite(t.weight), f"reward.terms.{i}.weight", "must be finite")
        _check(t.batch_size >= 1, f"reward.terms.{i}.batch_size", "must be >= 1")
        _check(t.max_length is None or t.max_length >= 8, f"reward.terms.{i}.max_length", "must be >= 8 or null")
    _check(rw.clip is None or rw.clip > 0, "reward.clip", "must be > 0 or null")
    _check(cfg.reference.placement == "local" or cfg.reference.mode == "copy", "reference.placement",
           "scorer needs reference.mode=copy (the shared reference is the policy itself, on the training rank)")
    sc = cfg.scorer
    _check(sc.timeout > 0 and sc.start_timeout > 0, "scorer.timeout", "timeout and start_timeout must be > 0")
    _check(sc.max_batch_tokens >= 1, "scorer.max_batch_tokens", "must be >= 1")
    _check(sc.cpu_threads is None or sc.cpu_threads >= 1, "scorer.cpu_threads", "must be >= 1 or null")
    for key, name in [(f"reward.terms.{i}.device", t.device) for i, t in enumerate(rw.terms)] + [
            ("reference.device", cfg.reference.device)]:
        _check(bool(DEVICE_RE.match(name)), key, f"{name!r} is not a device; use auto, cpu or cuda:N")
    _check(cfg.policy.quantization is None or r.device != "cpu", "policy.quantization",
           "bitsandbytes 8/4-bit weights need a GPU; remove it or set run.device=auto on a GPU machine")
    _check(cfg.logging.log_every >= 1, "logging.log_every", "must be >= 1")
    _check(cfg.logging.sample_every >= 0, "logging.sample_every", "must be >= 0")
    c = cfg.checkpoint
    _check(c.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
    _check(c.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    cr = cfg.critic
    _check(cr.lr is None or (cr.lr > 0 and math.isfinite(cr.lr)), "critic.lr", "must be a positive number or null")
    _check(cr.lam is None or 0.0 <= cr.lam <= 1.0, "critic.lam", "must be in [0, 1] or null")
    _check(cr.value_clip_range > 0, "critic.value_clip_range", "must be > 0")
    _check(cr.warmup_steps >= 0, "critic.warmup_steps", "must be >= 0")
    if p.estimator != "gae":
        _check(cr.mode != "adapter", "critic.mode",
               f"adapter builds a critic that ppo.estimator={p.estimator} (critic-free) never uses; use shared")
        _check(cr.warmup_steps == 0, "critic.warmup_steps",
               f"ppo.estimator={p.estimator} trains no critic, so there is nothing to warm up; set it to 0")
    if cr.mode == "adapter":
        _check(not cfg.policy.gradient_checkpointing, "policy.gradient_checkpointing",
               "cannot be combined with critic.mode=adapter: the recomputation in the backward pass would run "
               "with whichever adapter is active then")
        if cr.lora is not None:
            _check(cr.lora.r >= 1 and len(cr.lora.target_modules) > 0, "critic.lora",
                   "needs r >= 1 and at least one target module")
    e = cfg.evaluation
    _check(0 <= e.term < len(rw.terms), "evaluation.term", f"must index reward.terms (0..{len(rw.terms) - 1})")
    _check(e.num_samples >= 1, "evaluation.num_samples", "must be >= 1")
    _check(e.samples_per_prompt >= 1, "evaluation.samples_per_prompt", "must be >= 1")
    names = []
    for i, j in enumerate(cfg.judges):
        _check(bool(j.model), f"judges.{i}.model", "must name a model")
        _check(bool(j.label), f"judges.{i}.label", "must name a label")
        _check(0.0 < j.threshold < 1.0, f"judges.{i}.threshold", f"must be in (0, 1), got {j.threshold}")
        _check(j.batch_size >= 1, f"judges.{i}.batch_size", "must be >= 1")
        _check(j.max_length is None or j.max_length >= 8, f"judges.{i}.max_length", "must be >= 8 or null")
        name = j.name or j.model
        _check(name not in names, f"judges.{i}.name", f"{name!r} is used twice; give each judge its own name")
        names.append(name)
    a = cfg.alarms
    _check(a.baseline_steps >= 1, "alarms.baseline_steps", "must be >= 1")
    _check(a.patience >= 1, "alarms.patience", "must be >= 1")
    _check(a.window >= 2, "alarms.window", "must be >= 2")
    for key in ("entropy_drop", "short_share", "repetition", "judge_disagreement"):
        v = getattr(a, key)
        _check(v is None or 0.0 < v < 1.0, f"alarms.{key}", f"must be in (0, 1) or null, got {v}")
    for key in ("length_drift", "kl_growth"):
        v = getattr(a, key)
        _check(v is None or v > 0, f"alarms.{key}", f"must be > 0 or null, got {v}")
    _check(a.kl_floor >= 0, "alarms.kl_floor", "must be >= 0")
    _check(a.reward_per_kl is None or a.reward_per_kl > 0, "alarms.reward_per_kl", "must be > 0 or null")


# --------------------------------------------------------------------------------------------------------------
# Documentation: attribute docstrings -> Markdown
# --------------------------------------------------------------------------------------------------------------
def _attribute_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
    return docs


def markdown_reference() -> str:
    """Every config key with its default and docstring, as Markdown (docs/CONFIG.md)."""
    lines = ["# Configuration reference", "",
             "Generated from `train/config.py` by `python -m detoxrl.train.config --markdown > docs/CONFIG.md`.",
             "Set keys in a YAML recipe or on the command line as `section.key=value`.", ""]
    default = Config()

    def section(obj: Any, prefix: str) -> None:
        docs = _attribute_docs(type(obj))
        rows, subs = [], []
        for f in fields(obj):
            value = getattr(obj, f.name)
            if is_dataclass(value):
                subs.append((value, f"{prefix}{f.name}."))
                continue
            shown = json.dumps(asdict(value[0])) + " ..." if value and isinstance(value, list) and is_dataclass(value[0]) \
                else json.dumps(value)
            rows.append(f"| `{prefix}{f.name}` | `{shown}` | {docs.get(f.name, '')} |")
            if isinstance(value, list) and value and is_dataclass(value[0]):
                subs.append((value[0], f"{prefix}{f.name}.N."))
        if rows:
            lines.extend([f"## `{prefix.rstrip('.')}`", "", "| key | default | meaning |", "|---|---|---|", *rows, ""])
        for obj2, pre in subs:
            section(obj2, pre)

    top_docs = _attribute_docs(Config)
    for f in fields(default):
        lines.append(f"<!-- {f.name}: {top_docs.get(f.name, '')} -->")
        value = getattr(default, f.name)
        if isinstance(value, list):  # a top-level list of sections (judges): document one element
            lines.extend([f"## `{f.name}`", "", f"A list (default `{json.dumps([asdict(v) for v in value])}`). "
                          f"{top_docs.get(f.name, '')}", ""])
            section(JudgeConfig(), f"{f.name}.N.")
            continue
        section(value, f"{f.name}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    if "--markdown" in sys.argv:
        sys.stdout.write(markdown_reference())
    else:
        sys.stdout.write(to_yaml(Config()))
