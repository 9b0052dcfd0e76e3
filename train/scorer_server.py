"""A scorer process: `python -m detoxrl.train.scorer_server STORE_PORT INDEX`, spawned by its machine's first
training rank (train/scorers.py, which describes the transport). It loads ONE copy of each model its spec names
(reward terms, the reference copy) on its device, reports what it holds, joins the machine's scorer group and serves
rounds of requests (one from every local training rank) until every rank says stop, or a rank's connection drops
(the run ended or died: it exits then too).

Reward requests of a round are scored together: `scorer.batching: packed` sorts all ranks' texts by length and
scores them in shared batches of up to `scorer.max_batch_tokens` padded tokens; `per_rank` scores each rank's texts
as its own `local` term would (bitwise the same). Reference requests likewise: packed re-pads the ranks' requests to
one shape and runs them together up to the token budget; per_rank runs each alone, as `local` does.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from detoxrl.train.scorers import (HEADER, OP_LOGITS, OP_REFERENCE, OP_SHUTDOWN, TAG_REPLY, TAG_REQUEST, decode_texts,
                                   loopback_group)

FOREVER = timedelta(days=30)  # a scorer waits for the ranks as long as they train; a dropped connection ends it


def model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def memory_report(device: torch.device) -> dict[str, int]:
    if device.type == "cuda":
        return {"cuda_allocated_bytes": int(torch.cuda.memory_allocated(device)),
                "cuda_reserved_bytes": int(torch.cuda.memory_reserved(device))}
    status = Path("/proc/self/status")
    rss = next((int(x.split()[1]) * 1024 for x in status.read_text().splitlines() if x.startswith("VmRSS")), 0) \
        if status.exists() else 0
    return {"process_rss_bytes": rss}


def load_models(spec: dict, cfg, paths: dict):
    """(reward terms by index, reference or None, the report of what is held)."""
    from detoxrl.train import assets
    from detoxrl.train.models import build_reference_copy
    from detoxrl.train.reward import RewardTerm

    device = torch.device(spec["device"])
    dtype = lambda name: getattr(torch, name.split(".")[-1])  # noqa: E731  ("torch.float32" -> torch.float32)
    terms, held = {}, []
    for i in spec["terms"]:
        term_cfg = cfg.reward.terms[i]
        terms[i] = RewardTerm(term_cfg, assets.resolve(term_cfg.model, "reward"), device,
                              dtype(paths["dtypes"][str(i)]))
        held.append({"model": f"reward term {i}: {term_cfg.model}", "dtype": str(terms[i].dtype),
                     "bytes": model_bytes(terms[i].model)})
    reference = None
    if spec["reference"]:
        reference = build_reference_copy(cfg.policy, cfg.reference, paths["policy"], paths["kind"], device,
                                         dtype(paths["dtypes"]["reference"]))
        held.append({"model": f"reference: {cfg.policy.model}", "dtype": str(next(reference.lm.parameters()).dtype),
                     "bytes": model_bytes(reference.lm)})
    return terms, reference, {"ok": True, "device": spec["device"], "pid": os.getpid(), "models": held,
                              **memory_report(device)}


def receive(group, src: int) -> tuple[torch.Tensor, torch.Tensor]:
    h = torch.zeros(HEADER, dtype=torch.int64)
    group.recv([h], src, TAG_REQUEST).wait()
    if int(h[0]) == OP_SHUTDOWN:
        return h, torch.empty(0)
    payload = torch.empty(int(h[2]), dtype=torch.uint8 if int(h[3]) == 0 else torch.int64)
    group.recv([payload], src, TAG_REQUEST).wait()
    return h, payload


def reward_round(term, requests: list[tuple[torch.Tensor, torch.Tensor]], batching: str,
                 max_tokens: int) -> list[torch.Tensor]:
    """Logits for every rank's texts: one shared length-sorted batch set (packed) or each rank's own (per_rank)."""
    texts = [decode_texts(p) for _, p in requests]
    with_prompt = bool(requests[0][0][4])
    prompts = [t["prompts"] if with_prompt else [""] * len(t["responses"]) for t in texts]
    if batching == "per_rank":
        return [term.logits(p, t["responses"], with_prompt) for p, t in zip(prompts, texts)]
    counts = [len(t["responses"]) for t in texts]
    logits = term.logits([x for p in prompts for x in p], [x for t in texts for x in t["responses"]], with_prompt,
                         max_batch_tokens=max_tokens)
    return list(torch.split(logits, counts))


def reference_round(reference, requests, temperature: float, group_k: int, batching: str,
                    max_tokens: int) -> list[torch.Tensor]:
    """Log-probs (B_r, T_r) for every rank's request: each request alone (per_rank: as `local` computes them), or
    (packed) consecutive requests re-padded to a common prompt and response length and run together, as many as
    fit in `max_tokens` padded tokens (rows x (prompt + response length))."""
    from detoxrl.train.models import reference_logprobs

    unpacked = []
    for h, payload in requests:
        b, p, t = (int(x) for x in h[4:7])
        ids, mask, resp = torch.split(payload, [b * p, b * p, b * t])
        unpacked.append((ids.view(b, p), mask.view(b, p), resp.view(b, t)))
    if batching == "per_rank":
        return [reference_logprobs(None, reference, *u, temperature, group=group_k).cpu().contiguous()
                for u in unpacked]
    out: list[torch.Tensor] = []
    for chunk in request_chunks([(u[0].shape[0], u[0].shape[1] + u[2].shape[1]) for u in unpacked], max_tokens):
        part = [unpacked[i] for i in chunk]
        ids, mask, resp = repad(part, left=reference.kind == "causal")
        logp = reference_logprobs(None, reference, ids, mask, resp, temperature, group=group_k).cpu()
        start = 0
        for pid, _, r in part:
            out.append(logp[start:start + pid.shape[0], :r.shape[1]].contiguous())
            start += pid.shape[0]
    return out


def request_chunks(sizes: list[tuple[int, int]], max_tokens: int) -> list[list[int]]:
    """Consecutive requests (rows, length each) grouped while rows x the longest length stays within
    `max_tokens` (at least one request per chunk)."""
    chunks: list[list[int]] = []
    rows = longest = 0
    for i, (b, n) in enumerate(sizes):
        if chunks and (rows + b) * max(longest, n) <= max_tokens:
            chunks[-1].append(i)
            rows, longest = rows + b, max(longest, n)
        else:
            chunks.append([i])
            rows, longest = b, n
    return chunks


def repad(part, left: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack requests: prompts padded to the longest (on the left for causal policies, whose prompts are
    left-padded; masked either way), responses on the right (later positions never change earlier log-probs)."""
    p_max = max(u[0].shape[1] for u in part)
    t_max = max(u[2].shape[1] for u in part)

    def pad(x: torch.Tensor, width: int, on_left: bool) -> torch.Tensor:
        extra = torch.zeros(x.shape[0], width - x.shape[1], dtype=x.dtype)
        return torch.cat([extra, x] if on_left else [x, extra], dim=1)

    return (torch.cat([pad(u[0], p_max, left) for u in part]), torch.cat([pad(u[1], p_max, left) for u in part]),
            torch.cat([pad(u[2], t_max, False) for u in part]))


def fault(index: int, served: int) -> None:
    """Test hook DETOXRL_TEST_SCORER_FAULT=INDEX:die@N or INDEX:hang@N: scorer INDEX dies / hangs at round N."""
    spec = os.environ.get("DETOXRL_TEST_SCORER_FAULT", "")
    if not spec.startswith(f"{index}:"):
        return
    what, at = spec.split(":", 1)[1].split("@")
    if served == int(at):
        print(f"test fault: scorer {index} {what}s at round {served}", flush=True)
        if what == "die":
            os._exit(9)
        time.sleep(10_000)


def serve(group, local_world: int, terms: dict, reference, cfg, index: int) -> int:
    """Serve rounds (one request from every local rank) until every rank says stop; returns the rounds served."""
    served = 0
    while True:
        requests = [receive(group, r) for r in range(local_world)]
        ops = {(int(h[0]), int(h[1])) for h, _ in requests}
        if ops == {(OP_SHUTDOWN, 0)}:
            return served
        if len(ops) != 1:
            raise RuntimeError(f"the local ranks sent different requests in one round: {sorted(ops)}")
        served += 1
        fault(index, served)
        op, term = ops.pop()
        if op == OP_LOGITS:
            replies = reward_round(terms[term], requests, cfg.scorer.batching, cfg.scorer.max_batch_tokens)
        elif op == OP_REFERENCE:
            replies = reference_round(reference, requests, cfg.generation.temperature, cfg.ppo.k,
                                      cfg.scorer.batching, cfg.scorer.max_batch_tokens)
        else:
            raise RuntimeError(f"unknown request {op}")
        for r, reply in enumerate(replies):
            group.send([reply.float().contiguous()], r, TAG_REPLY).wait()


def main(argv: list[str]) -> int:
    from detoxrl.train.config import load_config

    port, index = int(argv[0]), int(argv[1])
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=600))
    status_key = f"scorer/{index}/status"
    try:
        spec = json.loads(store.get(f"scorer/{index}/spec"))
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(store.get("config").decode())
            f.flush()
            cfg = load_config(f.name)
        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        terms, reference, report = load_models(spec, cfg, json.loads(store.get("paths")))
    except Exception as err:  # the ranks are waiting on this key: tell them why, in one line
        store.set(status_key, json.dumps({"ok": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0]}"
                                          if str(err) else type(err).__name__}))
        raise
    store.set(status_key, json.dumps(report))
    print(f"scorer {index} on {spec['device']} ready: {report}", flush=True)
    local_world = spec["local_world"]
    group = loopback_group(store, local_world + index, local_world + spec["scorers"], FOREVER)
    try:
        served = serve(group, local_world, terms, reference, cfg, index)
    except RuntimeError as err:  # a rank went away (the run ended badly or was killed): nothing left to serve
        print(f"scorer {index}: stopping: {str(err).splitlines()[0]}", flush=True)
        return 1
    print(f"scorer {index}: every rank said stop after {served} rounds", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
