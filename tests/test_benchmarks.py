"""The benchmark harness (benchmarks/): it runs on tiny models and produces complete records. No timing assertions:
CI machines are shared and slow; the figures live in benchmarks/RESULTS.md.

The TRL baseline needs its own virtualenv (trl 1.12 + torch pinned to this one's version), built once and reused
from $DETOXRL_TRL_VENV, else $DETOXRL_CACHE/trl-venv, else ~/.cache/detoxrl/trl-venv; that test is `slow` and skips
with pip's reason when the virtualenv cannot be built (no network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))  # benchmarks/ is a top-level folder of the repository, not part of the package
from benchmarks import ppo_throughput as bench  # noqa: E402
from detoxrl.train.config import load_config  # noqa: E402

# read at collection, before any fixture points DETOXRL_CACHE at a temporary folder: the TRL venv must be reused
_CACHE = os.environ.get("DETOXRL_CACHE")
TRL_VENV = Path(os.environ.get("DETOXRL_TRL_VENV") or (
    Path(_CACHE).expanduser() if _CACHE else Path.home() / ".cache" / "detoxrl") / "trl-venv")
TRL011_VENV = Path(os.environ.get("DETOXRL_TRL011_VENV") or (
    Path(_CACHE).expanduser() if _CACHE else Path.home() / ".cache" / "detoxrl") / "trl011-venv")

RECORD_KEYS = {"config", "preset", "device", "threads", "batch_size", "prompt_tokens", "new_tokens", "samples_per_s",
               "tokens_per_s", "step_seconds", "phase_seconds", "phase_share", "largest_phase", "peak_memory",
               "baselines", "machine", "versions", "date", "command", "load_average", "overrides"}


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench_cache")


def run_harness(module: str, args: list[str], cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update({"DETOXRL_CACHE": str(cache), "DETOXRL_TRL_VENV": str(TRL_VENV),
                "DETOXRL_TRL011_VENV": str(TRL011_VENV), "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def records(stdout: str) -> list[dict]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every stdout line is a JSON record, nothing else


def check_record(rec: dict, seeds: bool = True) -> None:
    assert RECORD_KEYS <= set(rec), RECORD_KEYS - set(rec)
    assert rec["status"] == "ok" and rec["samples_per_s"] > 0 and rec["tokens_per_s"] > 0
    assert set(bench.PHASES) <= set(rec["phase_seconds"]) and rec["largest_phase"] in rec["phase_share"]
    assert rec["timed_steps"] == 2
    assert rec["peak_memory"]["cpu_rss_mb"] > 0 and "gpu_max_allocated_mb" in rec["peak_memory"]
    if seeds:
        base = rec["baselines"]["seeds"]
        assert base["status"] == "ok" and base["samples_per_s"] > 0
        assert base["ratio"] == pytest.approx(rec["samples_per_s"] / base["samples_per_s"])


def test_tiny_preset_produces_complete_records(bench_cache, tmp_path):
    results = tmp_path / "RESULTS.md"
    proc = run_harness("benchmarks.ppo_throughput", ["--preset", "tiny", "--iterations", "2", "--baselines", "seeds",
                                                     "--threads", "1", "--results", str(results)], bench_cache)
    recs = records(proc.stdout)
    assert [r["config"] for r in recs] == [b.name for b in bench.PRESETS["tiny"]]
    for rec in recs:
        check_record(rec)
        assert rec["threads"] == 1 and rec["device"] == "cpu"
    table = results.read_text()
    assert "preset `tiny`" in table and "--preset tiny --iterations 2" in table
    assert all(f"| {r['config']} |" in table for r in recs)


@pytest.mark.slow
def test_trl_baseline_and_reward_curves(bench_cache, tmp_path):
    from benchmarks.trl_env import TRLUnavailable, ensure_trl_venv

    try:
        ensure_trl_venv(TRL_VENV)
    except TRLUnavailable as err:
        pytest.skip(f"TRL 1.12 virtualenv cannot be built here (pip): {str(err).splitlines()[0]}")
    results = tmp_path / "RESULTS.md"
    # (the seeds' baseline of this preset: test_tiny_preset_produces_complete_records)
    proc = run_harness("benchmarks.ppo_throughput", ["--preset", "tiny", "--only", "tiny-gpt2-causal", "--iterations",
                                                     "2", "--baselines", "trl", "--threads", "1", "--results",
                                                     str(results)], bench_cache)
    (rec,) = records(proc.stdout)
    check_record(rec, seeds=False)
    trl = rec["baselines"]["trl"]
    assert trl["status"] == "ok", trl
    assert trl["samples_per_s"] > 0 and trl["ratio"] == pytest.approx(rec["samples_per_s"] / trl["samples_per_s"])
    assert trl["versions"]["trl"].startswith("1.12.")
    assert "TRL venv: trl 1.12." in results.read_text()

    proc = run_harness("benchmarks.reward_curves", ["--seeds", "0", "--steps", "2", "--threads", "1", "--results",
                                                    str(results)], bench_cache)
    curves = json.loads(proc.stdout)
    assert len(curves["ours"]["0"]) == 2 and len(curves["trl"]["0"]) == 2
    assert "reward curves" in results.read_text()


@pytest.mark.slow
def test_trl011_baselines_both_ways(bench_cache, tmp_path):
    """TRL 0.11.4 (the seeds' library) on the tiny T5 preset, the notebook's one-prompt loop and batched generate.
    Reuses a TRL 0.11.4 virtualenv built earlier (benchmarks.learning or the harness build it once); CI does not
    build a third virtualenv, so without one this skips."""
    if not (TRL011_VENV / ".detoxrl-ready.json").is_file():
        pytest.skip(f"no TRL 0.11.4 virtualenv at {TRL011_VENV} (built on first use by python -m benchmarks."
                    "ppo_throughput --preset tiny; not built inside the tests)")
    results = tmp_path / "RESULTS.md"
    proc = run_harness("benchmarks.ppo_throughput", ["--preset", "tiny", "--only", "tiny-t5-detox", "--iterations",
                                                     "1", "--baselines", "trl011-loop,trl011-batched", "--threads",
                                                     "1", "--results", str(results)], bench_cache)
    (rec,) = records(proc.stdout)
    for mode in ("loop", "batched"):
        x = rec["baselines"][f"trl011-{mode}"]
        assert x["status"] == "ok", x
        assert x["mode"] == mode and x["versions"]["trl"] == "0.11.4" and x["timed_steps"] == 1
        assert 0 < x["phase_seconds"]["generate"] < x["step_seconds"]
        assert x["ratio"] == pytest.approx(rec["samples_per_s"] / x["samples_per_s"])
    table = results.read_text()
    assert "TRL 0.11.4 venv: trl 0.11.4" in table and "ours/batched" in table


def test_gpu_configurations_are_recorded_as_pending_without_a_gpu(bench_cache):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the memory study would run for real")
    proc = run_harness("benchmarks.ppo_throughput", ["--preset", "memory", "--only", "flan-t5-xxl-lora",
                                                     "--no-append"], bench_cache)
    (rec,) = records(proc.stdout)
    assert rec["status"] == "skipped" and "GPU" in rec["reason"]


@pytest.mark.parametrize("preset", sorted(bench.PRESETS))
def test_every_preset_builds_a_valid_detoxrl_config(preset, tmp_path):
    """Override typos would only show on a GPU machine otherwise: load every configuration's config (no models)."""
    paths = {"policy": tmp_path / "policy", "reward": tmp_path / "reward", "data": tmp_path / "data"}
    for b in bench.PRESETS[preset]:
        for cuda in (False, True) if not b.quantization else (True,):  # 8-bit is refused on the CPU
            recipe, overrides = bench.ours_overrides(b, paths, tmp_path / "out", 3, 2, cuda)
            cfg = load_config(recipe, overrides + bench.SEEDS_OVERRIDES)
            assert cfg.generation.min_new_tokens == cfg.generation.max_new_tokens == b.new_tokens
            assert cfg.ppo.batch_size * b.processes == b.batch and cfg.generation.rollout_batch_size == 1
            assert cfg.policy.quantization == b.quantization


def test_summary_and_markdown_from_step_metrics():
    steps = [{"time/step": 2.0, "time/generate": 1.0, "time/reward": 0.2, "time/reference": 0.2,
              "time/old_logprobs": 0.2, "time/ppo_update": 0.3, "perf/tokens_per_s": 8.0, "env/reward_mean": 0.5}] * 3
    s = bench.summarize_steps(steps, warmup=1, batch=4)
    assert s["samples_per_s"] == pytest.approx(2.0) and s["tokens_per_s"] == pytest.approx(8.0)
    assert s["largest_phase"] == "generate" and s["phase_share"]["generate"] == pytest.approx(0.5)
    assert s["phase_seconds"]["other"] == pytest.approx(0.1) and s["timed_steps"] == 2
    rec = {"config": "x", "device": "cpu", "threads": 1, "batch_size": 4, "prompt_tokens": 8, "new_tokens": 4,
           "status": "ok", "peak_memory": {"cpu_rss_mb": 100.0, "gpu_max_allocated_mb": None},
           "baselines": {"seeds": {"status": "ok", "samples_per_s": 0.5, "ratio": 4.0},
                         "trl": {"status": "unavailable", "reason": "no network"}}, **s}
    header = {"date": "today", "preset": "tiny", "command": "python -m benchmarks.ppo_throughput --preset tiny",
              "machine": {"cpu": "cpu", "cores": 2, "memory_gb": 1, "gpu": None, "python": "3"},
              "versions": {"torch": "2"}, "threads": 1, "load_start": [0.5, 0.5, 0.5], "load_end": [0.7, 0.6, 0.5],
              "warmup": 1, "iterations": 2}
    md = bench.markdown_section([rec], header)
    row = next(line for line in md.splitlines() if line.startswith("| x |"))
    assert "| 2.00 |" in row and "| 4.00x |" in row and "generate (50%)" in row and "unavailable" in row
    assert "no network" in md and "load average" in md
    # --repeats: paired rounds, each ratio from its own round; the median and range of the ratios
    rounds = [rec, {**rec, "samples_per_s": 3.0, "baselines": {
        "seeds": {"status": "ok", "samples_per_s": 1.0, "ratio": 3.0}, "trl": rec["baselines"]["trl"]}},
        {**rec, "samples_per_s": 1.0, "baselines": {"seeds": {"status": "ok", "samples_per_s": 0.2, "ratio": 5.0}}}]
    combined = bench.with_rounds(rounds)
    assert combined["samples_per_s"] == 2.0 and len(combined["rounds"]) == 3
    assert combined["ratio_rounds"] == {"seeds": {"ratios": [4.0, 3.0, 5.0], "median": 4.0, "min": 3.0, "max": 5.0,
                                                  "n": 3}}
    md = bench.markdown_section([combined], header)
    assert ("`x` against seeds, 3 paired rounds (the table shows the first): ratios 4.00x, 3.00x, 5.00x; "
            "**median 4.00x** (range 3.00-5.00x); ours 1.00-3.00 samples/s.") in md
    assert bench.with_rounds([rec]) == rec and "rounds" not in bench.markdown_section([rec], header)


def test_learning_benchmark_smoke(demo_assets, demo_cache, tmp_path):
    """2 steps x 2 seeds of one detoxrl configuration on the T5 toy: complete records, intervals, the table."""
    results = tmp_path / "RESULTS.md"
    proc = run_harness("benchmarks.learning", ["--toy", "t5", "--configs", "smoke", "--custom",
                                               "smoke=optim.lr=1e-3 ppo.ppo_epochs=1", "--seeds", "0,1", "--steps",
                                               "2", "--runs", str(tmp_path / "runs"), "--results", str(results)],
                       demo_cache)
    (rec,) = records(proc.stdout)
    assert rec["status"] == "ok" and rec["config"] == "smoke" and set(rec["per_seed"]) == {"0", "1"}
    for curve in rec["curves"].values():
        assert len(curve) == 2 and all(step["responses"] == 16 for step in curve)
        assert all(0.0 <= step["toxic_share"] <= 1.0 and 0.0 < step["distinct2"] <= 1.0 for step in curve)
        assert curve[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # step 1 samples the untrained policy
    for key in ("reward_gain", "gain_per_step", "toxic_start", "toxic_end", "kl_end", "distinct2_rel", "wall_s"):
        mean, lo, hi = rec["summary"][key]
        assert lo <= mean <= hi, key
    assert rec["summary"]["wall_s"][0] > 0 and set(rec["meets_targets"]) == {"toxic_end", "kl_end", "distinct2_rel"}
    table = results.read_text()
    assert "learning benchmark, `t5` toy" in table and "| smoke | 2/2 |" in table and "--steps 2" in table
    # a second invocation reuses the two cached runs instead of training again
    again = run_harness("benchmarks.learning", ["--configs", "smoke", "--custom", "smoke=optim.lr=1e-3 "
                        "ppo.ppo_epochs=1", "--seeds", "0,1", "--steps", "2", "--runs", str(tmp_path / "runs"),
                        "--no-append"], demo_cache)
    assert "2 run(s) cached, 0 to run" in again.stderr
    assert records(again.stdout)[0]["per_seed"] == rec["per_seed"]


def test_learning_summaries_and_intervals():
    from benchmarks import learning

    curve = [{"reward": 1.0, "toxic_share": 0.5, "distinct2": 0.8, "kl": 0.0, "responses": 16, "seconds": 1.0}]
    curve += [{"reward": 3.0, "toxic_share": 0.25, "distinct2": 0.4, "kl": 2.0, "responses": 16, "seconds": 1.0}] * 9
    s = learning.run_summary(curve)
    assert s["reward_gain"] == pytest.approx(2.0) and s["gain_per_step"] == pytest.approx(0.2)
    assert s["toxic_start"] == 0.5 and s["toxic_end"] == 0.25 and s["distinct2_rel"] == pytest.approx(0.5)
    assert s["kl_end"] == 2.0 and s["responses"] == 160 and s["wall_s"] == 10.0
    start = learning.pooled_start([curve, [dict(curve[0], reward=2.0)] + curve[1:]])
    assert start == {"reward": 1.5, "toxic_share": 0.5, "distinct2": 0.8}
    assert learning.run_summary(curve, start)["reward_gain"] == pytest.approx(1.5)
    mean, lo, hi = learning.mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sd sqrt(2.5), t(0.975, 4) = 2.776: half-width 2.776 * 1.5811 / sqrt(5) = 1.963
    assert mean == 3.0 and hi - mean == pytest.approx(1.963, abs=1e-3) and mean - lo == pytest.approx(hi - mean)
    assert learning.mean_interval([2.0]) == (2.0, 2.0, 2.0)
    assert learning.meets_targets({"toxic_end": [0.3, 0.2, 0.4], "kl_end": [3.5, 3, 4], "distinct2_rel": [0.6, 0, 1]}) \
        == {"toxic_end": True, "kl_end": False, "distinct2_rel": True}
    with pytest.raises(SystemExit, match="unknown configuration"):
        learning.resolve_configuration("nope", {})
    assert learning.resolve_configuration("trl011-lr1e-3", {}).lr == 1e-3


def test_fast_paths_smoke(bench_cache):
    """benchmarks.fast_paths on the tiny preset: both engines time the same rollout, the bucketed update computes
    fewer padded slots than the padded one (a complete record; no timing assertion)."""
    proc = run_harness("benchmarks.fast_paths", ["--preset", "tiny", "--batch-size", "8", "--iterations", "1",
                                                 "--engines", "hf,static", "--max-new", "32", "--mini-batch", "8",
                                                 "--gas", "2", "--no-append"], bench_cache)
    (rec,) = records(proc.stdout)
    gen, upd = rec["generate"], rec["update"]
    assert gen["hf"]["engine"] == "hf" and gen["static"]["engine"] == "static" and gen["static"]["fallback"] is None
    assert gen["hf"]["speedup_vs_hf"] == 1.0 and gen["static"]["seconds"] > 0
    assert upd["bucketed"]["update_slots_per_epoch"] < upd["padded"]["update_slots_per_epoch"]
    assert set(upd["speedup"]) == {"reference_s", "old_logprobs_s", "update_s"}


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")]).returncode == 0


def test_scorer_overlap_summary_and_markdown():
    """The scorer benchmark's arithmetic (the harness itself runs for minutes: benchmarks/RESULTS.md)."""
    from types import SimpleNamespace

    from benchmarks.scorer_overlap import PHASES, markdown, summary

    def record(placement, step, **phases):
        return {"placement": placement, "step_seconds": step, "phases": {p: phases.get(p, 0.0) for p in PHASES},
                "load_average_at_start": [1.0, 1.0, 1.0]}

    records = [record("local", 3.0, reward=1.0, reference=0.3, old_logprobs=0.5),
               record("scorer", 2.4, old_logprobs=0.5, reference=0.3, wait_reward=0.2)]
    s = summary(records)
    assert s["saving_s"] == pytest.approx(0.6) and s["saving_share"] == pytest.approx(0.2)
    assert s["expected_saving_s"] == pytest.approx(0.8)  # reward || reference + old log-probs: 1.8 -> 1.0
    assert summary(records, reference_scorer=True)["expected_saving_s"] == pytest.approx(0.8)  # 1.8 -> max 1.0
    args = SimpleNamespace(rounds=1, steps=6, warmup=2, batch_size=32, threads=1, reference_scorer=False, launch=None,
                           policy_size="mini", reward_size="medium")
    text = markdown(records, s, args, {"cpu": "test cpu", "cores": 2})
    assert "saved 0.600 s (+20.0%)" in text and "1-minute load average" in text and "--reward-size medium" in text
