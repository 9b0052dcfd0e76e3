"""Evaluate two or more policies on the same prompts with the same sampling seeds.

    prompts    the recipe's data config on the chosen split (test by default), the first N usable rows
    work       the trainer's held-out plan (train/heldout.py): N prompts x `samples_per_prompt` draws, in fixed
               chunks of `batch_size`, chunk c sampled with seed (seed, c), the same for every policy; under
               `accelerate launch` rank r takes chunks r, r + W, ... — so every sample depends only on its chunk,
               1 or N processes give the same numbers, and they are the trainer's before/after figures
    generate   per policy: batched sampling, then the sequence log-prob of each response under the policy and
               under the first policy (the baseline); their difference is the sample's KL estimate
    score      every reward term of the recipe (the prompt, when a term scores it, is cut from the left), the
               toxicity = P(toxic label) of the evaluation classifier on the response alone, and each judge's
               P(toxic) (the recipe's `judges`: classifiers never trained against)
    gather     per-sample records from all ranks; the main process computes the metrics and writes the report

Only one policy besides the baseline is in memory at a time, and the classifiers are loaded after generation.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch

from detoxrl.eval import metrics as M
from detoxrl.eval.policies import LoadedPolicy, PolicySource, load_policy
from detoxrl.eval.records import compute_metrics, sample_rows
from detoxrl.train import assets
from detoxrl.train.config import Config, GenerationConfig, RewardTermConfig, config_hash
from detoxrl.train.data import build_prompts, load_rows
from detoxrl.train.distributed import make_accelerator
from detoxrl.train.experience import score_responses as score_all
from detoxrl.train.heldout import heldout_generation, sample_chunk, sample_chunks
from detoxrl.train.judges import Judge
from detoxrl.train.models import lm_forward, load_tokenizer, resolve_dtype
from detoxrl.train.ppo_math import logprobs_from_logits
from detoxrl.train.reward import RewardModel, RewardTerm, resolve_label
from detoxrl.train.rollout import Rollout
from detoxrl.train.tracking import package_versions, setup_logging

log = logging.getLogger("detoxrl.eval")

SCHEMA_VERSION = 1


@dataclass
class EvalSettings:
    """Everything that decides the numbers (recorded in metrics.json)."""
    split: str = "test"
    """Data split the prompts come from."""
    num_samples: int = 32
    """Prompts (the first N usable rows of the split)."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt (each sample from its own seeded chunk); the recipe's
    evaluation.samples_per_prompt by default."""
    seed: int = 0
    """Sampling seed; chunk c of every policy is sampled with seed (seed, c)."""
    batch_size: int = 32
    """Prompts per generate() call = per seeded chunk (changing it changes the samples)."""
    max_new_tokens: int = 32
    """Maximum response tokens: one fixed number for all policies (default: the recipe's `max_new_tokens`, or the
    low end of its `max_new_tokens_range`)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Sampling settings (do_sample=False: greedy)."""
    classifier: Optional[str] = None
    """Toxicity classifier (hub name / folder / `demo`); None = the recipe's reward term `term`."""
    term: int = 0
    """Reward term whose classifier measures toxicity when `classifier` is None."""
    toxic_label: str = "hate"
    """Label whose probability is the toxicity."""
    judge_thresholds: dict[str, float] = field(default_factory=dict)
    """P(toxic) at or above which each judge (by name) calls a response toxic (the recipe's `judges`)."""
    toxicity_required: bool = False
    """Fail (instead of skipping toxicity with a warning) when the classifier lacks `toxic_label`."""
    bootstrap: int = 2000
    """Bootstrap resamples for the confidence intervals (0 = none)."""
    confidence: float = 0.95
    """Confidence level of the intervals."""
    device: str = "auto"
    """`auto` (each rank's accelerator device, else CPU) or `cpu`."""
    cpu_threads: Optional[int] = None
    """Torch CPU threads per process (the recipe's run.cpu_threads by default)."""
    progress: bool = True
    """Progress bar on the main process."""


def settings_from_config(cfg: Config, **overrides: Any) -> EvalSettings:
    """The recipe's evaluation and generation sections as defaults; keyword overrides win (None = keep)."""
    g = heldout_generation(cfg.generation)  # one fixed length for every policy, as the trainer's held-out figures
    s = EvalSettings(split=cfg.evaluation.split, num_samples=cfg.evaluation.num_samples,
                     samples_per_prompt=cfg.evaluation.samples_per_prompt, seed=cfg.run.seed,
                     batch_size=g.rollout_batch_size, max_new_tokens=g.max_new_tokens, generation=replace(g),
                     term=cfg.evaluation.term, toxic_label=cfg.evaluation.toxic_label,
                     cpu_threads=cfg.run.cpu_threads,
                     judge_thresholds={j.name or j.model: j.threshold for j in cfg.judges})
    gen_keys = {"do_sample", "top_k", "top_p", "temperature", "min_new_tokens"}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in gen_keys:
            setattr(s.generation, key, value)
        else:
            setattr(s, key, value)
    if min(s.num_samples, s.samples_per_prompt, s.batch_size, s.max_new_tokens) < 1:
        raise ValueError("num_samples, samples_per_prompt, batch_size and max_new_tokens must be >= 1")
    s.generation = heldout_generation(s.generation, s.max_new_tokens, s.batch_size)
    return s


def sequence_logprob(lm, kind: str, rollout: Rollout, temperature: float) -> torch.Tensor:
    """Sum of the response tokens' log-probs (B,) under `lm`, at the sampling temperature, as in training."""
    with torch.inference_mode():
        logits, _ = lm_forward(lm, kind, rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, False)
        logp = logprobs_from_logits(logits, rollout.response_ids, temperature).float()
    return (logp * rollout.response_mask.float()).sum(1).cpu()


def same_vocabulary(a, b) -> bool:
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def score_responses(terms: list[RewardTerm], toxicity: Optional[tuple[RewardTerm, str]], prompts: list[str],
                    responses: list[str], judges: Optional[list[Judge]] = None) -> dict[str, Any]:
    """Every reward term (the prompt cut from the left where a term scores it), their weighted sum, the toxicity
    of the response alone, and each judge's P(toxic), as the trainer scores them (experience.score_responses).
    Plain lists, in input order."""
    scored = score_all(RewardModel(terms), prompts, responses, toxicity, judges or [])
    return {"reward": scored.reward.tolist(), "terms": [s.tolist() for s in scored.terms],
            "toxicity": scored.toxicity.tolist() if scored.toxicity is not None else None,
            "judges": {name: v.tolist() for name, v in scored.judges.items()}}


@dataclass
class EvalResult:
    """What the main process returns: metrics.json's content and the sample table (as in samples.csv)."""
    metrics: dict[str, Any]
    samples: list[dict[str, Any]]
    output_dir: Optional[Path]


def _settings_record(cfg: Config, settings: EvalSettings, info: dict, paths: dict, n: int, world: int,
                     device, dtype, run_dir: Optional[Path]) -> dict:
    """The `settings` block of metrics.json: what was evaluated, how, and with which packages."""
    temperature = settings.generation.temperature if settings.generation.do_sample else 1.0
    return {
        **{k: v for k, v in asdict(settings).items() if k not in ("progress",)},
        "num_samples_used": n, "num_responses": n * settings.samples_per_prompt, "temperature_for_kl": temperature,
        "dataset": cfg.data.dataset, "dataset_path": paths["data"], "template": cfg.data.template,
        "text_field": cfg.data.text_field, "reference_field": cfg.data.reference_field,
        "max_prompt_tokens": cfg.data.max_prompt_tokens, "toxicity": info["toxicity"],
        "reward_terms": info["reward_terms"], "judges": info["judges"],
        "world_size": world, "device": str(device), "dtype": str(dtype), "run_dir": str(run_dir) if run_dir else None,
        "recipe_hash": config_hash(cfg), "packages": {**package_versions(), **_eval_packages()},
    }


def evaluate(cfg: Config, sources: list[PolicySource], settings: EvalSettings, output_dir: Optional[Path] = None,
             run_dir: Optional[Path] = None) -> Optional[EvalResult]:
    """Run the comparison. Every rank must call it; the main process returns the result (others None) and, given
    `output_dir`, writes metrics.json, samples.csv, samples.md and report.html there."""
    if len(sources) < 1:
        raise ValueError("evaluation needs at least one policy")
    t_start = time.perf_counter()
    accelerator = make_accelerator(settings.device, 1)
    if settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    setup_logging(is_main)
    device = accelerator.device
    dtype = resolve_dtype(cfg.policy.dtype, device)
    with accelerator.main_process_first():  # the demo's assets are built once, by the main process
        paths = _resolve_paths(cfg, settings)
        rows = load_rows(paths["data"], settings.split)
    prompt_sets = _prompt_sets(cfg, sources, settings, rows)
    first_prompts = prompt_sets[(sources[0].tokenizer_path, sources[0].kind)]
    n_prompts = len(first_prompts)
    plan = sample_chunks(n_prompts, settings.samples_per_prompt, settings.batch_size)
    n = n_prompts * settings.samples_per_prompt  # samples; sample s answers prompt s % n_prompts
    chunks = {c: samples for c, samples in enumerate(plan) if c % world == rank}
    log.info("evaluating %d policies on %d prompts x %d samples of %r split %r (%d chunks of %d, %d process(es))",
             len(sources), n_prompts, settings.samples_per_prompt, cfg.data.dataset, settings.split, len(plan),
             settings.batch_size, world)

    from tqdm.auto import tqdm
    bar = tqdm(total=2 * len(chunks) * len(sources), desc="eval", unit="chunk", dynamic_ncols=True,
               disable=not (is_main and settings.progress))
    t0 = time.perf_counter()
    records, kl_available = _generate(sources, prompt_sets, settings, chunks, device, dtype, bar, is_main)
    t_generate = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = _score(cfg, settings, sources, prompt_sets, records, paths, device, bar)
    bar.close()
    t_score = time.perf_counter() - t0

    # ---- gather and report ------------------------------------------------------------------------------
    if world > 1:
        from accelerate.utils import gather_object
        records = gather_object(records)
    accelerator.wait_for_everyone()
    if not is_main:
        accelerator.end_training()
        return None
    records.sort(key=lambda r: (r["policy"], r["index"]))
    per_policy = [[r for r in records if r["policy"] == i] for i in range(len(sources))]
    for i, recs in enumerate(per_policy):
        if [r["index"] for r in recs] != list(range(n)):
            raise RuntimeError(f"gathered samples of policy {i} are incomplete ({len(recs)} of {n})")
    settings_out = _settings_record(cfg, settings, info, paths, n_prompts, world, device, dtype, run_dir)
    references = [first_prompts.references[s % n_prompts] for s in range(n)]
    texts = [first_prompts.texts[s % n_prompts] for s in range(n)]
    result_metrics = compute_metrics(per_policy, references, sources, info["term_names"], kl_available, settings)
    metrics_doc = {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": settings_out,
        "baseline": sources[0].label,
        "policies": [{"label": s.label, "identity": s.identity(), "metrics": m}
                     for s, m in zip(sources, result_metrics)],
        "timing": {"generate_s": round(t_generate, 3), "score_s": round(t_score, 3),
                   "total_s": round(time.perf_counter() - t_start, 3)},
    }
    metrics_doc["flags"] = M.judge_flags(metrics_doc)
    samples = sample_rows(per_policy, texts, references, sources, info["term_names"])
    if output_dir is not None:
        from detoxrl.eval.report import write_report
        write_report(Path(output_dir), metrics_doc, samples, run_dir)
        log.info("evaluation written to %s", output_dir)
    accelerator.end_training()
    return EvalResult(metrics_doc, samples, Path(output_dir) if output_dir else None)


def _resolve_paths(cfg: Config, settings: EvalSettings) -> dict[str, Any]:
    """Loadable paths of the data, the reward terms, the toxicity classifier (None: a reward term's) and judges."""
    return {"data": assets.resolve(cfg.data.dataset, "data"),
            "reward": [assets.resolve(t.model, "reward") for t in cfg.reward.terms],
            "toxicity": assets.resolve(settings.classifier, "reward") if settings.classifier else None,
            "judges": [assets.resolve(j.model, "judge") for j in cfg.judges]}


def _prompt_sets(cfg: Config, sources: list[PolicySource], settings: EvalSettings,
                 rows) -> dict[tuple[str, str], Any]:
    """The prompts tokenized once per distinct (tokenizer, kind) of the policies; every set keeps the same rows."""
    data_cfg = replace(cfg.data, split=settings.split, max_samples=settings.num_samples)
    prompt_sets: dict[tuple[str, str], Any] = {}
    for src in sources:
        key = (src.tokenizer_path, src.kind)
        if key not in prompt_sets:
            tok = load_tokenizer(src.tokenizer_path, src.kind, None, src.trust_remote_code)
            prompt_sets[key] = build_prompts(rows, data_cfg, tok, src.kind, cfg.run.seed)
    sizes = {len(p) for p in prompt_sets.values()}
    if len(sizes) != 1:
        raise ValueError(f"the policies' tokenizers keep different numbers of prompts ({sorted(sizes)})")
    n = sizes.pop()
    if n < settings.num_samples:
        log.warning("only %d usable prompts in split %r (asked for %d)", n, settings.split, settings.num_samples)
    return prompt_sets


def _generate(sources: list[PolicySource], prompt_sets: dict[tuple[str, str], Any], settings: EvalSettings,
              chunks: dict[int, list[int]], device: torch.device, dtype: torch.dtype, bar,
              is_main: bool) -> tuple[list[dict[str, Any]], list[bool]]:
    """Per policy and chunk of this rank: responses (chunk c sampled with seed (seed, c)), lengths, and the KL to
    the baseline (the first policy). Returns the records and, per policy, whether its KL is available."""
    gen = settings.generation
    temperature = gen.temperature if gen.do_sample else 1.0
    records: list[dict[str, Any]] = []
    baseline = load_policy(sources[0], device, dtype)
    kl_available: list[bool] = []
    for i, src in enumerate(sources):
        policy: LoadedPolicy = baseline if i == 0 else load_policy(src, device, dtype)
        prompts = prompt_sets[(src.tokenizer_path, src.kind)]
        kl_ok = i == 0 or (policy.kind == baseline.kind and same_vocabulary(policy.tokenizer, baseline.tokenizer))
        if not kl_ok and is_main:
            log.warning("policy %s does not share the baseline's vocabulary: no KL to it", src.label)
        kl_available.append(kl_ok)
        for c, idx in chunks.items():
            rollout, responses = sample_chunk(policy, prompts.input_ids, idx, c, settings.seed, policy.tokenizer, gen,
                                              device)
            if i == 0:
                kl = [0.0] * len(idx)
            elif kl_ok:
                kl = (sequence_logprob(policy.lm, policy.kind, rollout, temperature)
                      - sequence_logprob(baseline.lm, baseline.kind, rollout, temperature)).tolist()
            else:
                kl = [None] * len(idx)
            lengths = rollout.response_mask.sum(1).tolist()
            ended = rollout.ended.tolist()
            for k, j in enumerate(idx):
                records.append({"policy": i, "index": j, "chunk": c, "response": responses[k],
                                "response_tokens": int(lengths[k]), "ended": bool(ended[k]), "kl": kl[k]})
            bar.update()
        if i:
            del policy
            gc.collect()  # free this policy before the next one loads (matters for large models)
    del baseline
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return records, kl_available


def _score(cfg: Config, settings: EvalSettings, sources: list[PolicySource], prompt_sets: dict[tuple[str, str], Any],
           records: list[dict[str, Any]], paths: dict[str, Any], device: torch.device, bar) -> dict[str, Any]:
    """Adds reward, terms, toxicity and judges to each record (the classifiers load now, after generation);
    returns what metrics.json says about the classifiers."""
    # Every classifier on this rank's device (the recipe's per-term devices are for training layouts).
    terms = [RewardTerm(t, path, device, torch.float32) for t, path in zip(cfg.reward.terms, paths["reward"])]
    toxicity, tox_info = _toxicity_classifier(cfg, settings, terms, paths["toxicity"], device)
    judges = [Judge(j, path, device) for j, path in zip(cfg.judges, paths["judges"])]
    by_key: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in records:
        by_key.setdefault((r["policy"], r["chunk"]), []).append(r)
    chunks = sorted({r["chunk"] for r in records})
    for i, src in enumerate(sources):
        prompts = prompt_sets[(src.tokenizer_path, src.kind)]
        for c in chunks:
            recs = by_key[(i, c)]
            scored = score_responses(terms, toxicity, [prompts.texts[r["index"] % len(prompts)] for r in recs],
                                     [r["response"] for r in recs], judges)
            for k, r in enumerate(recs):
                r["reward"] = scored["reward"][k]
                r["terms"] = [s[k] for s in scored["terms"]]
                r["toxicity"] = scored["toxicity"][k] if scored["toxicity"] is not None else None
                r["judges"] = {name: v[k] for name, v in scored["judges"].items()}
            bar.update()
    term_names = [f"{t.cfg.model}/{t.cfg.label}" for t in terms]
    term_info = [{"name": name, **asdict(t.cfg), "path": path, "label_index": t.label_index,
                  "window": t.max_length} for name, t, path in zip(term_names, terms, paths["reward"])]
    judge_info = [{"name": j.name, "model": j.cfg.model, "path": path, "label": j.cfg.label,
                   "label_index": j.term.label_index, "threshold": j.cfg.threshold}
                  for j, path in zip(judges, paths["judges"])]
    return {"term_names": term_names, "reward_terms": term_info, "judges": judge_info, "toxicity": tox_info}


def _eval_packages() -> dict[str, Optional[str]]:
    import importlib.metadata

    out = {}
    for name in ("rouge-score", "matplotlib"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _toxicity_classifier(cfg: Config, settings: EvalSettings, terms: list[RewardTerm], tox_path: Optional[str],
                         device: torch.device) -> tuple[Optional[tuple[RewardTerm, str]], dict[str, Any]]:
    """The evaluation classifier and label: a named one, or the recipe's reward term `settings.term`."""
    label = settings.toxic_label
    if settings.classifier:
        term_cfg = RewardTermConfig(model=settings.classifier, label=label, output="probability", score="response")
        term = RewardTerm(term_cfg, tox_path, device, torch.float32)  # an unknown label fails here, listing labels
        return (term, label), {"classifier": settings.classifier, "path": tox_path, "label": label,
                               "label_index": term.label_index, "from_reward_term": None}
    if not 0 <= settings.term < len(terms):
        raise ValueError(f"toxicity term {settings.term} does not exist (the recipe has {len(terms)} reward terms)")
    term = terms[settings.term]
    info = {"classifier": term.cfg.model, "path": None, "label": label, "from_reward_term": settings.term}
    try:
        info["label_index"] = resolve_label(term.model.config.id2label, label, term.cfg.model)
    except ValueError as err:
        if settings.toxicity_required:
            raise
        log.warning("no toxicity: %s. Name the classifier's toxic label with --toxic-label (or another classifier "
                    "with --classifier)", err)
        return None, {**info, "skipped": str(err)}
    return (term, label), info
