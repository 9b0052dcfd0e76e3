"""The PPO training loop. Reads top to bottom; each step of one PPO iteration is numbered as in
docs/ARCHITECTURE.md. Steps 1-5 call train/experience.py and end in one `Experience`; step 6 is
train/update.py; step 7's figures are train/metrics.py.

    setup: accelerator, preflight (configs, tokenizers, data: bad input fails before any weights load), models
           (policy + value head, reference, reward), optimizer (train/build.py), resume
    for each step (`run_steps`):
        1. prompts      this rank's shard of the shuffled prompt set
        2. rollout      batched sampling from the policy (LoRA on), decoded to text
        3. reward       re-tokenize for each classifier, score in length-sorted batches
        4. reference    log-probs under the frozen reference; old log-probs and values under the policy
                        (3 and 4 are submitted first: scorer processes compute them meanwhile, train/scorers.py)
        5. advantages   per-token -beta*KL + score on the last token; GAE with the critic or a critic-free
                        estimator over the k responses per prompt; normalised over the global batch
        6. PPO epochs   clipped policy + value losses (+ KL loss) over shuffled mini-batches with gradient
                        accumulation; only the critic steps during its warm-up
        7. bookkeeping  KL controller, metrics (reduced over ranks), samples, checkpoint, stop request
    finish: final adapter + value head, before/after evaluation

SIGTERM, SIGINT and SIGUSR1 ask for a clean stop: every rank finishes the current step, the ranks agree on it at
the step boundary, write a checkpoint together, and `train` returns with `stopped_by` set (the CLI exits with
status 75, cli.EXIT_STOPPED). Running the same command again resumes from that checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from detoxrl.train import checkpoint as ckpt
from detoxrl.train.atomic import atomic_directory
from detoxrl.train.build import Progress, Trainer, build_trainer
from detoxrl.train.config import Config, config_hash
from detoxrl.train.distributed import any_rank, describe, gathered_trainable, generation_weights, sum_reducer
from detoxrl.train.experience import (Experience, advantages_and_returns, draw_max_new_tokens, kept_from_rollout,
                                      old_logprobs_and_values, sample_responses, shaped_scores)
from detoxrl.train.heldout import compare_before_after, heldout_evaluation
from detoxrl.train.judges import judge_step, submit_reward_toxicity
from detoxrl.train.metrics import global_kl, step_metrics
from detoxrl.train.reward import Deferred
from detoxrl.train.scorers import ScorerError, machine_rank, submit_reference_logprobs
from detoxrl.train.signals import StopRequest
from detoxrl.train.tracking import PhaseTimer, RunLogger, package_versions, sample_rows, write_json
from detoxrl.train.update import UpdateResult, loss_terms, ppo_update

log = logging.getLogger("detoxrl.train")


class NonFiniteLossError(RuntimeError):
    """Too many PPO steps in a row produced a NaN/inf loss."""


@dataclass
class RunResult:
    output_dir: Path
    steps_done: int
    final_dir: Optional[Path]
    metrics: list[dict[str, float]]           # metrics of the steps run in this process (main process only)
    evaluation: Optional[dict[str, Any]]      # before/after held-out figures when evaluation.before_after
    policy: Any = None                        # the trained PolicyWithValue (unwrapped), for in-process callers
    stopped_by: Optional[str] = None          # signal name (or "alarm ...") when the run ended early (checkpointed)
    is_main: bool = True                      # False on every rank but the main process
    alarm_stop: bool = False                  # True when alarms.action=stop ended the run
    alarms_fired: Optional[dict[str, int]] = None  # alarm name -> the step it first fired


def train(cfg: Config) -> RunResult:
    with StopRequest() as stop:
        return _train(cfg, stop)


def _train(cfg: Config, stop: StopRequest) -> RunResult:
    t, progress = build_trainer(cfg)                         # setup
    try:
        return _train_built(t, progress, stop)
    finally:
        if t.scorers is not None:  # stopped with the run, however it ends (a resume starts them afresh)
            t.scorers.close()


def _train_built(t: Trainer, progress: Progress, stop: StopRequest) -> RunResult:
    cfg = t.cfg
    resume_from = resume(t, progress)
    start_step = progress.step
    write_run_info(t, resume_from)
    if cfg.evaluation.before_after and "before" not in progress.evaluation:
        evaluate_heldout(t, progress, "before")
    # Sampling differs per rank (different prompts AND different random streams); model init was identical.
    if resume_from is None:
        torch.manual_seed(cfg.run.seed + 1 + t.rank)
    logger = RunLogger(t.out, t.is_main, cfg.run.total_steps, start_step, cfg.logging.tensorboard,
                       cfg.logging.progress_bar)
    history: list[dict[str, float]] = []
    try:
        stopped_by = run_steps(t, progress, stop, logger, history)
    finally:
        logger.close()
    if stopped_by is not None:
        t.accelerator.wait_for_everyone()
        t.accelerator.end_training()
        return RunResult(t.out, progress.step, None, history, None, t.unwrapped, stopped_by=stopped_by,
                         is_main=t.is_main, alarm_stop=stopped_by.startswith("alarm"),
                         alarms_fired=dict(progress.monitor.first_fired))
    return finish(t, progress, start_step, logger, history)


def run_steps(t: Trainer, progress: Progress, stop: StopRequest, logger: RunLogger,
              history: list[dict[str, float]]) -> Optional[str]:
    """The PPO iterations from `progress.step` on; returns what stopped them early (None: all done)."""
    cfg, accelerator, policy, prompts = t.cfg, t.accelerator, t.policy, t.inputs.prompts
    k, temp, reduce_fn = cfg.ppo.k, cfg.generation.temperature, sum_reducer(accelerator)
    nonfinite_in_row = 0
    for step in range(progress.step, cfg.run.total_steps):
        timer = PhaseTimer(t.device)
        t_step = time.perf_counter()
        step_start = (ckpt.rng_state(), progress.sampler.state_dict()) if t.scorers else None

        # 1. prompts: this rank's shard of the global batch (batch_size / k prompts)
        idx = progress.sampler.next_indices()
        texts = [prompts.texts[i] for i in idx for _ in range(k)]  # one per response

        # 2. rollout: batched sampling, chunked by generation.rollout_batch_size; k responses per prompt; decoded
        with timer("time/generate"), generation_weights(accelerator, policy,
                                                        cfg.generation.zero3_gather_weights) as synced:
            rollout, responses = sample_responses(t.unwrapped, [prompts.input_ids[i] for i in idx],
                                                  t.inputs.tokenizer, cfg.generation, draw_max_new_tokens(cfg, step),
                                                  t.device, synced, k=k,
                                                  keep=kept_from_rollout(cfg, t.unwrapped.critic_mode))
        mask = rollout.response_mask.float()

        # 3. reward and 4. reference log-probs: sent to the scorers, which compute them while this rank computes
        #    its old log-probs and values (placement: scorer); or computed here and now (local)
        with timer("time/reward"):  # reward: response text re-tokenized by each classifier, length-sorted batches
            reward_job = t.reward.submit(texts, responses)
            tox_job = submit_reward_toxicity(t.judges, t.tox_term, cfg.evaluation.toxic_label, responses)
        with timer("time/reference"):
            ref_job = submit_reference_logprobs(t.unwrapped, t.reference, rollout, temp, policy, k,
                                                cfg.generation.rollout_batch_size * k, cfg.ppo.bucket_by_length)
        with timer("time/old_logprobs"):  # or kept from sampling (ppo.rollout_logprobs)
            old_logp, old_values = old_logprobs_and_values(policy, rollout, cfg.generation.rollout_batch_size * k,
                                                           temp, want_values=cfg.ppo.estimator == "gae", group=k,
                                                           bucket=cfg.ppo.bucket_by_length)
        (raw_scores, term_scores), reward_tox, ref_logp = wait_for_scorers(t, progress, logger, step_start, timer,
                                                                           reward_job, tox_job, ref_job)
        scores = shaped_scores(cfg, raw_scores, rollout.ended, progress.moments, reduce_fn, t.device)

        # 5. advantages: per-token rewards (-beta*KL unless the KL is a loss term, + the score on the last
        #    token); GAE with the critic, or a critic-free estimator; normalised over the global batch
        advantages, returns, kl = advantages_and_returns(cfg, scores, old_logp, ref_logp, old_values, mask,
                                                         progress.kl_ctl.value, reduce_fn)
        exp = Experience(rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids, mask, old_logp, old_values,
                         advantages, returns, ref_logp, ended=rollout.ended, prompt_indices=idx, prompt_texts=texts,
                         responses=responses, raw_scores=raw_scores, term_scores=term_scores, scores=scores, kl=kl)
        terms = loss_terms(cfg, step, progress.kl_ctl.value, returns, mask, reduce_fn)

        # 6. PPO epochs over shuffled mini-batches; micro-batches accumulate gradients (during the critic's
        #    warm-up the policy's parameters take no step)
        with timer("time/ppo_update"):
            update = ppo_update(accelerator, policy, t.optimizer, t.scheduler, exp, cfg.ppo, temp,
                                shuffle_seed=cfg.run.seed * 100003 + step, terms=terms)
        debug_record(f"rank-{t.rank:05d}.jsonl", {
            "step": step + 1, "rank": t.rank, "prompt_indices": idx, "response_lengths":
            rollout.response_mask.sum(1).tolist(), "loss": update.stats["loss"], "skipped": update.skipped})
        nonfinite_in_row = check_skipped(cfg, step, update, nonfinite_in_row)

        # 7. bookkeeping: KL controller, metrics reduced over ranks, samples, alarms, checkpoint
        with timer("time/judges"):
            judged, reward_tox = judge_step(t.judges, reward_tox, responses)
        kl_coef_used = progress.kl_ctl.value
        progress.kl_ctl.update(global_kl(accelerator, exp), cfg.ppo.batch_size * t.world)
        progress.samples_seen += cfg.ppo.batch_size * t.world
        metrics = step_metrics(accelerator, exp, update, terms, kl_coef_used, t.reward, t.judges, judged,
                               reward_tox, cfg.generation.min_new_tokens, timer.seconds,
                               time.perf_counter() - t_step, t.scheduler.get_last_lr())
        progress.step = done = step + 1
        firing = progress.monitor.update(done, metrics)  # adds alarm/* to metrics; identical on every rank
        log_step(t, logger, done, metrics, exp, judged)
        history.append({"step": done, **metrics})
        stopped_by = checkpoint_or_stop(t, progress, logger, stop, firing)
        if stopped_by is not None:
            return stopped_by
    return None


def wait_for_scorers(t: Trainer, progress: Progress, logger: RunLogger, step_start, timer: PhaseTimer,
                     reward_job: Deferred, tox_job: Deferred, ref_job: Deferred):
    """The step's reward, the reward classifier's P(toxic) for the judges, and the reference log-probs, timed as
    `time/wait_reward` / `time/wait_reference` (the time this rank waited on each scorer; ~0 for local
    placement). With scorers, the ranks then agree (one all-reduce) on whether a scorer failed on any machine: if
    one did, every rank puts back the random streams and data position of the step's start, writes a checkpoint
    of the last finished step (unless one exists), and raises ScorerError."""
    failure, results = None, []
    jobs = (("time/wait_reward", reward_job), ("time/wait_reward", tox_job), ("time/wait_reference", ref_job))
    for name, job in jobs:
        with timer(name):
            try:
                results.append(job.result() if failure is None else None)
            except ScorerError as err:
                failure = str(err)
    if t.scorers is None or not any_rank(t.accelerator, failure is not None):
        return results
    from accelerate.utils import gather_object

    named = [f for f in (gather_object([failure]) if t.world > 1 else [failure]) if f]
    ckpt.set_rng_state(step_start[0])
    progress.sampler.load_state_dict(step_start[1])
    done, path = progress.step, None
    if done > 0:
        path = ckpt.step_dir(t.out / "checkpoints", done)
        if ckpt.is_valid(path) is not None:
            path = save(t, progress, logger, done)
    where = f"checkpoint {path} (step {done}); run the same command again to resume" if path else \
        "no step finished, so no checkpoint"
    raise ScorerError(f"{named[0]}; every rank stopped, {where}")


def checkpoint_or_stop(t: Trainer, progress: Progress, logger: RunLogger, stop: StopRequest,
                       firing: list[str]) -> Optional[str]:
    """After step `progress.step`: a checkpoint every checkpoint.every_steps (the last step's is written by
    `finish`); a stop (returns why) when any rank got a stop request or an alarm with alarms.action=stop fired."""
    cfg, done = t.cfg, progress.step
    saved = bool(cfg.checkpoint.every_steps and done % cfg.checkpoint.every_steps == 0)
    if saved and done < cfg.run.total_steps:
        save(t, progress, logger, done)
    # a stop request on any rank stops every rank here, after the same step (one tiny all-reduce); so does
    # an alarm with alarms.action=stop (the same decision on every rank: it reads reduced metrics)
    alarm_stop = progress.monitor.should_stop(firing)
    if done < cfg.run.total_steps and (alarm_stop or any_rank(t.accelerator, stop.signum is not None)):
        stopped_by = f"alarm {', '.join(firing)}" if alarm_stop else (stop.name or "a signal on another rank")
        path = ckpt.step_dir(t.out / "checkpoints", done) if saved else save(t, progress, logger, done)
        log.warning("stopped after step %d of %d (%s); checkpoint %s. Run the same command again to resume.",
                    done, cfg.run.total_steps, stopped_by, path)
        return stopped_by
    return None


def check_skipped(cfg: Config, step: int, update: UpdateResult, nonfinite_in_row: int) -> int:
    """Warn about skipped mini-batches; stop after run.max_nonfinite_steps steps in a row with a non-finite loss.
    Returns the new count of such steps in a row."""
    if update.nonfinite:
        nonfinite_in_row += 1
        log.warning("step %d: %d mini-batch(es) had a non-finite loss and were skipped (%d step(s) in a "
                    "row)", step + 1, update.nonfinite, nonfinite_in_row)
        if nonfinite_in_row >= cfg.run.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{nonfinite_in_row} PPO steps in a row had non-finite losses (run.max_nonfinite_steps="
                f"{cfg.run.max_nonfinite_steps}); stopping. The last checkpoint and the weights before "
                f"these steps are kept. Lower optim.lr or check the reward model's outputs.")
        return nonfinite_in_row
    if update.skipped:
        log.warning("step %d: skipped %d mini-batch(es) whose mean ratio exceeded ppo.ratio_threshold=%g",
                    step + 1, update.skipped, cfg.ppo.ratio_threshold)
    return 0


def log_step(t: Trainer, logger: RunLogger, done: int, metrics: dict[str, float], exp: Experience,
             judged: dict[str, Any]) -> None:
    """Scalars every logging.log_every steps (and the last), sample rows every logging.sample_every, progress."""
    cfg = t.cfg
    if done % cfg.logging.log_every == 0 or done == cfg.run.total_steps:
        logger.scalars(done, metrics)
    if cfg.logging.sample_every and done % cfg.logging.sample_every == 0:
        # one reference per response (k per prompt)
        references = [t.inputs.prompts.references[i] for i in exp.prompt_indices for _ in range(cfg.ppo.k)] \
            if cfg.data.reference_field else None
        logger.samples(done, sample_rows(exp.prompt_texts, references, exp.responses, exp.raw_scores,
                                         exp.term_scores, t.reward, judged)[:cfg.logging.num_samples])
    logger.progress(done, metrics["env/reward_mean"], metrics["objective/kl"])


# --------------------------------------------------------------------------------------------------------------
# Resume, checkpoints, run_info, held-out evaluation, finish
# --------------------------------------------------------------------------------------------------------------
def resume(t: Trainer, progress: Progress) -> Optional[Path]:
    """Restore weights, optimizer, schedule, RNG and `progress` from the checkpoint checkpoint.resume picks (rank 0
    cleans up and chooses; every rank then loads the same folder). Returns that folder, or None."""
    cfg = t.cfg
    from accelerate.utils import broadcast_object_list
    found = [ckpt.find_resume_checkpoint(t.out / "checkpoints", cfg.checkpoint.resume, t.is_main)
             if t.is_main else None]
    if t.world > 1:
        broadcast_object_list(found)
    resume_from = found[0]
    if resume_from is not None:
        ckpt.check_resumable(ckpt.read_trainer_state(resume_from), resume_from, cfg)
        t_load = time.perf_counter()
        state, rng_restored = ckpt.load_checkpoint(resume_from, t.accelerator, t.policy, t.optimizer, t.scheduler)
        if not rng_restored:  # other world size: still reproducible, from (seed, rank, step)
            torch.manual_seed(cfg.run.seed + 1 + t.rank + 1_000_003 * state.step)
        progress.restore(state)
        log.info("resumed from %s at step %d (%d samples seen; loaded in %.2f s)", resume_from, progress.step,
                 progress.samples_seen, time.perf_counter() - t_load)
    if progress.step >= cfg.run.total_steps:
        log.info("nothing to do: already at step %d of %d", progress.step, cfg.run.total_steps)
    return resume_from


def save(t: Trainer, progress: Progress, logger: RunLogger, step_done: int) -> Path:
    """Collective: a checkpoint of `step_done` steps (every rank calls it)."""
    logger.flush()  # the curves up to a checkpoint survive a later kill -9
    t0 = time.perf_counter()
    path = ckpt.save_checkpoint(t.accelerator, t.policy, t.optimizer, t.scheduler,
                                progress.state(step_done, t.cfg, t.world), t.out / "checkpoints", step_done,
                                t.cfg.checkpoint.keep_last)
    if t.is_main:
        log.info("checkpoint %s written in %.2f s (%.1f MB)", path, time.perf_counter() - t0,
                 sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6)
    return path


def write_run_info(t: Trainer, resume_from: Optional[Path]) -> None:
    """run_info.json: strategy, devices of every rank, dtypes, parameter counts, the scorers of every machine (what
    each holds and its memory: one copy per model), packages."""
    device, reference, reward = t.device, t.reference, t.reward
    devices = {"policy": str(device), "reference": str(reference.device) if reference else f"{device} (shared base)",
               "reward": {term.name: str(term.device) for term in reward.terms}}
    scorers = [] if t.scorers is None or t.scorers.local_rank != 0 else [
        {"machine": machine_rank(), **spec_info} for spec_info in t.scorers.info()]
    if t.world > 1:
        from accelerate.utils import gather_object
        devices_by_rank = gather_object([devices])
        scorers = gather_object(scorers) if t.scorers is not None else []
    if t.is_main:
        write_json(t.out / "run_info.json", {
            **describe(t.accelerator), "policy_kind": t.inputs.kind, "policy_dtype": str(t.dtype),
            "reward_dtypes": {term.name: str(term.dtype) for term in reward.terms},
            "reference_dtype": str(reference.dtype) if reference else str(t.dtype),
            "quantization": t.cfg.policy.quantization, "devices": devices,
            "devices_by_rank": devices_by_rank if t.world > 1 else [devices], "scorers": scorers,
            "parameters": {"total": t.parameters[0], "trainable": t.parameters[1]},
            "packages": package_versions(), "config_hash": config_hash(t.cfg),
            "resumed_from": str(resume_from) if resume_from else None})


def evaluate_heldout(t: Trainer, progress: Progress, when: str) -> dict[str, Any]:
    """progress.evaluation[when] ("before" | "after"): the held-out figures of the policy as it is now."""
    held = t.inputs.heldout
    n = min(t.cfg.evaluation.num_samples, len(held))
    try:
        with generation_weights(t.accelerator, t.policy, t.cfg.generation.zero3_gather_weights) as synced:
            progress.evaluation[when] = heldout_evaluation(t.unwrapped, t.inputs.tokenizer, held.input_ids[:n],
                                                           held.texts[:n], t.reward, t.cfg, t.device, synced,
                                                           t.judges)
    except ScorerError as err:  # every rank of the machine gets it (they share the scorer): say what is on disk
        raise ScorerError(f"{err} (in the held-out evaluation {when} training); {on_disk(t, progress.step, when)}") \
            from None
    if when == "before":
        log.info("held-out toxicity before training: %.4f (mean reward %.4f, %d prompts x %d samples)",
                 progress.evaluation["before"]["toxicity_mean"], progress.evaluation["before"]["reward_mean"], n,
                 t.cfg.evaluation.samples_per_prompt)
        if t.is_main:  # on disk now: a run stopped early (signal, alarm) still has its starting point
            write_json(t.out / "eval_before_after.json", progress.evaluation)
    return progress.evaluation[when]


def on_disk(t: Trainer, done: int, when: str) -> str:
    """What a failed held-out evaluation leaves, and how to go on."""
    if when == "after":
        path = ckpt.step_dir(t.out / "checkpoints", done)
        if ckpt.is_valid(path) is None:
            return (f"the trained policy is in {t.out / 'final'} and its checkpoint in {path}; run the same command "
                    f"again to redo only the evaluation")
        return f"the trained policy is in {t.out / 'final'} (detoxrl-eval can evaluate it)"
    if done == 0:
        return "no step ran; run the same command again"
    return f"run the same command again to resume from step {done}"


def finish(t: Trainer, progress: Progress, start_step: int, logger: RunLogger,
           history: list[dict[str, float]]) -> RunResult:
    """The last checkpoint, final/ (adapter, value head, tokenizer), and the before/after comparison."""
    cfg = t.cfg
    steps_done = max(start_step, cfg.run.total_steps)
    # (else resumed from this very checkpoint); with scorers always: one can still fail in the held-out evaluation,
    # and a rerun then redoes only that
    scorer_eval = t.scorers is not None and cfg.evaluation.before_after
    if (cfg.checkpoint.every_steps or scorer_eval) and start_step < cfg.run.total_steps:
        save(t, progress, logger, steps_done)
    final_dir = t.out / "final"
    with gathered_trainable(t.accelerator, t.policy):  # collective under ZeRO-3: every rank gathers, rank 0 writes
        if t.is_main:
            with atomic_directory(final_dir) as tmp:
                ckpt.save_policy_files(t.unwrapped, tmp)
                t.inputs.tokenizer.save_pretrained(str(tmp))
        if os.environ.get("DETOXRL_DEBUG_DIR"):  # test hook: every rank's copy of the trainable weights
            from safetensors.torch import save_file
            save_file({k: v.detach().float().cpu().contiguous() for k, v in t.unwrapped.trainable_state_dict().items()},
                      str(Path(os.environ["DETOXRL_DEBUG_DIR"]) / f"rank-{t.rank:05d}-trainable.safetensors"))
    evaluation = progress.evaluation
    if cfg.evaluation.before_after:
        evaluate_heldout(t, progress, "after")
        summary = compare_before_after(evaluation)
        if t.is_main:
            write_json(t.out / "eval_before_after.json", evaluation)
            print(summary, flush=True)
    t.accelerator.wait_for_everyone()
    t.accelerator.end_training()
    return RunResult(t.out, steps_done, final_dir, history, evaluation or None, t.unwrapped, is_main=t.is_main,
                     alarms_fired=dict(progress.monitor.first_fired))


def debug_record(name: str, record: dict[str, Any]) -> None:
    """Test hook: with DETOXRL_DEBUG_DIR set, each rank appends JSON lines to <dir>/<name> (prompts, lengths...)."""
    folder = os.environ.get("DETOXRL_DEBUG_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with open(Path(folder) / name, "a") as f:
            f.write(json.dumps(record) + "\n")
