"""Scorers, the training ranks' side: one scorer process per dedicated device per machine, holding ONE copy of each
reward model placed on that device and/or of the frozen reference, serving every training rank of its machine
(`reward.placement: scorer`, `reference.placement: scorer`; the process itself is train/scorer_server.py).

    plan_scorers       which scorer holds which model (one per device; the CPU counts as one device per model)
    start_scorers      the machine's first training rank spawns them; every local rank joins their process group
    ScorerPool         this rank's end: the remote reward terms and reference, failure naming, shutdown
    RemoteRewardTerm   a reward term whose logits a scorer computes (the RewardTerm interface: submit_logits, ...)
    RemoteReference    the frozen reference copy on a scorer
    submit_reference_logprobs  the loop's step 4 for either placement, as a Deferred

Transport: torch.distributed gloo, in a process group of its own per machine (not the training world: collectives
of accelerate / DeepSpeed never see the scorers). Its members are the machine's L training ranks (group ranks
0..L-1, by local rank) and its S scorers (L..L+S-1); it rendezvouses through a TCPStore that local rank 0 hosts on
the loopback, which also carries each scorer's spec (the resolved config, its models) and its ready/memory report.
A request is an int64 header (op, term, payload size, shape) and one payload tensor (UTF-8 JSON of the texts, or the
token ids); the answer is one float32 tensor whose shape the rank knows in advance, so it posts the receive at once
and works on while the scorer computes. Every local rank makes the same requests in the same order (the loop runs in
lock-step), so a scorer serves them in rounds: one request from each rank, one batch for all.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch

from detoxrl.train.config import Config, ScorerConfig, to_yaml
from detoxrl.train.reward import Deferred, label_probability_from_logits, resolve_label, term_score

log = logging.getLogger("detoxrl.scorers")

OP_SHUTDOWN, OP_LOGITS, OP_REFERENCE = 0, 1, 2
HEADER = 8           # int64 header: op, term index, payload numel, payload dtype (0 uint8, 1 int64), 4 op arguments
TAG_REQUEST, TAG_REPLY = 11, 12
GROUP_PREFIX = "group"
# environment a scorer must not inherit: it is no rank of the training world
WORLD_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
             "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_")


class ScorerError(RuntimeError):
    """A scorer died, stopped answering or could not start; the message names it and its log."""

    label = "scorer error"


@dataclass
class ScorerSpec:
    """What one scorer holds: reward term indices and/or the reference copy, on one device."""
    index: int
    device: str
    terms: list[int] = field(default_factory=list)
    reference: bool = False

    def describe(self) -> str:
        held = [f"reward term {i}" for i in self.terms] + (["reference"] if self.reference else [])
        return f"scorer {self.index} ({', '.join(held)} on {self.device})"


def plan_scorers(term_devices: list[Optional[str]], reference_device: Optional[str]) -> list[ScorerSpec]:
    """One scorer per device holding every model placed there (None: that model stays local). A CPU has many cores,
    so there each model gets a scorer of its own and they run in parallel."""
    specs: list[ScorerSpec] = []
    by_device: dict[str, ScorerSpec] = {}

    def holder(device: str) -> ScorerSpec:
        if device == "cpu" or device not in by_device:
            specs.append(ScorerSpec(len(specs), device))
            by_device.setdefault(device, specs[-1])
            return specs[-1]
        return by_device[device]

    for i, dev in enumerate(term_devices):
        if dev is not None:
            holder(dev).terms.append(i)
    if reference_device is not None:
        holder(reference_device).reference = True
    return specs


def encode_texts(payload: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(payload).encode()), dtype=torch.uint8)


def decode_texts(t: torch.Tensor) -> Any:
    return json.loads(bytes(t.numpy().tobytes()).decode())


def header(op: int, term: int = 0, payload: Optional[torch.Tensor] = None, *args: int) -> torch.Tensor:
    h = torch.zeros(HEADER, dtype=torch.int64)
    h[0], h[1] = op, term
    if payload is not None:
        h[2], h[3] = payload.numel(), 0 if payload.dtype == torch.uint8 else 1
    for k, a in enumerate(args):
        h[4 + k] = a
    return h


def raising(err: BaseException):
    def finish():
        raise err
    return finish


class ScorerPool:
    """This training rank's end of its machine's scorer group (`procs` and the store host on local rank 0 only)."""

    def __init__(self, group, local_rank: int, local_world: int, specs: list[ScorerSpec], cfg: ScorerConfig,
                 reports: list[dict[str, Any]], logs: list[Path], procs: list[subprocess.Popen], store) -> None:
        self.group, self.local_rank, self.local_world = group, local_rank, local_world
        self.specs, self.cfg, self.reports, self.logs, self.procs = specs, cfg, reports, logs, procs
        self.store = store  # kept alive: on local rank 0 it is the rendezvous server
        self.broken: Optional[str] = None

    def request(self, scorer: int, op: int, term: int, payload: torch.Tensor, args: list[int],
                reply_shape: tuple[int, ...]) -> Deferred:
        """Send one request to `scorer` and post the receive of its float32 answer; the Deferred waits for it
        (at most scorer.timeout seconds) and names the scorer if it died or hung."""
        # a failure is always raised by the Deferred, never here: the loop meets it where the ranks agree on it
        if self.broken:
            return Deferred(raising(ScorerError(self.broken)))
        dst = self.local_world + scorer
        out = torch.empty(reply_shape, dtype=torch.float32)
        try:
            works = [self.group.send([header(op, term, payload, *args)], dst, TAG_REQUEST),
                     self.group.send([payload.contiguous()], dst, TAG_REQUEST),
                     self.group.recv([out], dst, TAG_REPLY)]
        except RuntimeError as err:  # the connection was already gone when posting
            return Deferred(raising(self.failure(scorer, err)))

        def finish() -> torch.Tensor:
            t0 = time.perf_counter()
            for w in works:
                left = max(0.001, self.cfg.timeout - (time.perf_counter() - t0))
                try:
                    w.wait(timedelta(seconds=left))
                except RuntimeError as err:
                    raise self.failure(scorer, err) from err
            return out

        return Deferred(finish)

    def failure(self, scorer: int, err: BaseException) -> ScorerError:
        """The one-line error for a scorer that died or hung (its exit status when this rank started it)."""
        spec, text = self.specs[scorer], str(err)
        hung = "Timed out" in text or "timeout" in text.lower()
        status = None
        if self.procs and not hung:  # a closed connection: give the process a moment to be reaped
            try:
                status = self.procs[scorer].wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                pass
        if status is not None:
            why = f"died (exit status {status})"
        elif hung:
            why = f"did not answer within scorer.timeout={self.cfg.timeout:g} s (hung or overloaded)"
        elif "Connection closed" in text or "Connection reset" in text:
            why = "stopped answering (its connection closed: the process died or was killed)"
        else:
            why = f"stopped answering ({text.splitlines()[0][:160] if text else type(err).__name__})"
        self.broken = f"{spec.describe()} of machine rank {machine_rank()} {why}; its log: {self.logs[scorer]}"
        return ScorerError(self.broken)

    def info(self) -> list[dict[str, Any]]:
        """For run_info.json: each scorer's device, the models it holds (one copy each: dtype, bytes) and memory."""
        return [{"scorer": s.index, "device": s.device, **{k: v for k, v in r.items() if k != "ok"}}
                for s, r in zip(self.specs, self.reports)]

    def close(self, grace: float = 30.0) -> None:
        """Tell every scorer to stop (best effort), then reap the processes this rank started."""
        if self.broken is None:
            for k in range(len(self.specs)):
                try:
                    self.group.send([header(OP_SHUTDOWN)], self.local_world + k, TAG_REQUEST).wait(timedelta(seconds=5))
                except RuntimeError:
                    pass
        deadline = time.monotonic() + (grace if self.broken is None else 2.0)
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []


class RemoteRewardTerm:
    """A reward term scored by a scorer: the RewardTerm interface (`cfg`, `name`, `label_index`, `config`,
    `submit_logits`, `score`, `label_probability`); the model config is read locally (labels, problem type)."""

    def __init__(self, cfg, index: int, pool: ScorerPool, scorer: int, config, dtype: str) -> None:
        self.cfg, self.index, self.pool, self.scorer, self.config = cfg, index, pool, scorer, config
        self.name = cfg.model
        self.label_index = resolve_label(config.id2label, cfg.label, cfg.model)
        self.device = f"{pool.specs[scorer].device} (scorer {scorer})"
        self.dtype = dtype

    def submit_logits(self, prompts: list[str], responses: list[str], with_prompt: bool) -> Deferred:
        payload = encode_texts({"prompts": list(prompts) if with_prompt else [], "responses": list(responses)})
        return self.pool.request(self.scorer, OP_LOGITS, self.index, payload, [int(with_prompt)],
                                 (len(responses), self.config.num_labels))

    def logits(self, prompts: list[str], responses: list[str], with_prompt: bool) -> torch.Tensor:
        return self.submit_logits(prompts, responses, with_prompt).result()

    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return term_score(self, self.logits(prompts, responses, self.cfg.score == "prompt_response"))

    def label_probability(self, texts: list[str], label: str) -> torch.Tensor:
        return label_probability_from_logits(self, self.logits([""] * len(texts), texts, False), label)


class RemoteReference:
    """The frozen reference copy on a scorer: log-probs of a rank's responses, answered while the rank works on."""

    def __init__(self, pool: ScorerPool, scorer: int, dtype: str) -> None:
        self.pool, self.scorer, self.dtype = pool, scorer, dtype
        self.device = f"{pool.specs[scorer].device} (scorer {scorer})"

    def submit(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor) -> Deferred:
        (b, p), t = prompt_ids.shape, response_ids.shape[1]
        payload = torch.cat([prompt_ids.reshape(-1), prompt_mask.reshape(-1).long(), response_ids.reshape(-1)]).cpu()
        pending = self.pool.request(self.scorer, OP_REFERENCE, 0, payload, [b, p, t], (b, t))
        return Deferred(lambda: pending.result().to(response_ids.device))


def submit_reference_logprobs(policy, reference, rollout, temperature: float, forward, group: int, chunk: int,
                              bucket: bool) -> Deferred:
    """Step 4's reference log-probs (B, T): sent to the reference's scorer, or computed here now
    (experience.reference_in_chunks: the shared adapter-off policy or a local frozen copy, length-bucketed chunks of
    `chunk` rows with `bucket`)."""
    if isinstance(reference, RemoteReference):
        return reference.submit(rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids)
    from detoxrl.train.experience import reference_in_chunks

    return Deferred.done(reference_in_chunks(policy, reference, rollout, chunk, temperature, forward=forward,
                                             group=group, bucket=bucket))


# --------------------------------------------------------------------------------------------------------------
# Starting them
# --------------------------------------------------------------------------------------------------------------
def local_layout() -> tuple[int, int]:
    """(local rank, training ranks on this machine), from the launcher's environment."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def machine_rank() -> int:
    rank, local_rank, local_world = (int(os.environ.get(k, d)) for k, d in
                                     (("RANK", "0"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")))
    return (rank - local_rank) // max(1, local_world)


def loopback_group(store, rank: int, size: int, timeout: timedelta):
    """The machine's scorer group: gloo over the loopback (every member is on this machine; the default device would
    follow the hostname, which on a cluster may resolve to an interface meant for other traffic)."""
    import torch.distributed as dist

    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    return dist.ProcessGroupGloo(dist.PrefixStore(GROUP_PREFIX, store), rank, size, opts)


def scorer_env(threads: Optional[int]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(WORLD_ENV + ("ACCELERATE_",))}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def start_scorers(cfg: Config, specs: list[ScorerSpec], paths: dict[str, str], share_port, out: Path) -> ScorerPool:
    """Local rank 0 hosts the rendezvous store, writes each scorer's spec into it and spawns the scorers; every
    local rank then waits for their ready reports and joins the machine's scorer group. `share_port(port or None)`
    returns the store port of this rank's local rank 0 (a collective over the training world)."""
    import torch.distributed as dist

    sc = cfg.scorer
    local_rank, local_world = local_layout()
    threads = sc.cpu_threads or cfg.run.cpu_threads
    log_dir = out / "scorers"
    logs = [log_dir / f"machine-{machine_rank()}-scorer-{s.index}.log" for s in specs]
    procs: list[subprocess.Popen] = []
    store = None
    if local_rank == 0:
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=sc.start_timeout))
        store.set("config", to_yaml(cfg))
        store.set("paths", json.dumps(paths))
        log_dir.mkdir(parents=True, exist_ok=True)
        for spec, log_path in zip(specs, logs):
            store.set(f"scorer/{spec.index}/spec", json.dumps({
                "index": spec.index, "device": spec.device, "terms": spec.terms, "reference": spec.reference,
                "local_world": local_world, "scorers": len(specs), "threads": threads}))
            with open(log_path, "ab") as f:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "detoxrl.train.scorer_server", str(store.port), str(spec.index)],
                    stdout=f, stderr=subprocess.STDOUT, env=scorer_env(threads)))
    port = share_port(store.port if store is not None else None)
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=sc.start_timeout))
    try:
        reports = wait_ready(store, specs, procs, logs, sc.start_timeout)
        group = loopback_group(store, local_rank, local_world + len(specs), timedelta(seconds=sc.timeout))
    except BaseException:
        for proc in procs:
            proc.kill()
        raise
    for spec, report in zip(specs, reports):
        log.info("%s ready: %s", spec.describe(), report.get("models"))
    return ScorerPool(group, local_rank, local_world, specs, sc, reports, logs, procs, store)


def wait_ready(store, specs: list[ScorerSpec], procs: list[subprocess.Popen], logs: list[Path],
               start_timeout: float) -> list[dict[str, Any]]:
    """Each scorer's report (models, bytes held, memory) once it has loaded; a scorer that failed to load, exited
    or took longer than scorer.start_timeout is a ScorerError naming it."""
    deadline = time.monotonic() + start_timeout
    reports: list[Optional[dict[str, Any]]] = [None] * len(specs)
    while any(r is None for r in reports):
        for k, spec in enumerate(specs):
            key = f"scorer/{spec.index}/status"
            if reports[k] is None and store.check([key]):
                reports[k] = json.loads(store.get(key))
                if not reports[k].get("ok"):
                    raise ScorerError(f"{spec.describe()} failed to start: {reports[k].get('error')}; its log: "
                                      f"{logs[k]}")
            elif reports[k] is None and procs and procs[k].poll() is not None:  # tell the other local ranks too
                store.set(key, json.dumps({"ok": False, "error": f"exited with status {procs[k].returncode} "
                                           "before it was ready"}))
        if time.monotonic() > deadline:
            late = [s.describe() for s, r in zip(specs, reports) if r is None]
            raise ScorerError(f"{', '.join(late)} not ready within scorer.start_timeout={start_timeout:g} s; "
                              f"logs in {logs[0].parent}")
        if any(r is None for r in reports):
            time.sleep(0.05)
    return reports  # type: ignore[return-value]
