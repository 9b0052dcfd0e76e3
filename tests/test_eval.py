"""detoxrl-eval: policy resolution, metrics, the report files, determinism, 1 vs 2 processes, the correctness guard
(a prompt longer than the classifier's window), the demo's before/after claim, plots, and the report in Chromium."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from detoxrl.eval import cli, metrics as M
from detoxrl.eval.evaluate import evaluate, score_responses, settings_from_config
from detoxrl.eval.policies import RunContext, resolve_policy, unique_labels
from detoxrl.train.config import RewardTermConfig, load_config
from detoxrl.train.loop import train
from detoxrl.train.reward import RewardTerm

from conftest import REPO
from test_train import FAST, recipe_overrides

RECIPES = REPO / "configs" / "ppo"
EVAL_ARGS = ["--num-samples", "12", "--samples-per-prompt", "1", "--batch-size", "5", "--bootstrap", "200", "--no-progress"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(test_models, tmp_path_factory) -> Path:
    """2 PPO steps of the headline recipe on the tiny test models (starts from an SFT adapter; checkpoints 1, 2)."""
    out = tmp_path_factory.mktemp("tiny_run")
    cfg = load_config(RECIPES / "flan_t5_base_dialogsum_detox.yaml",
                      [*recipe_overrides("flan_t5_base_dialogsum_detox", test_models), *FAST, "optim.lr=0.01",
                       "evaluation.before_after=false", f"run.output_dir={out}"])
    train(cfg)
    return out


@pytest.fixture(scope="module")
def demo_run(demo_assets, tmp_path_factory) -> Path:
    """A short run of the demo recipe (6 steps, checkpoints at 3 and 6): real summaries, a measurable change."""
    out = tmp_path_factory.mktemp("demo_run")
    train(load_config(RECIPES / "demo.yaml", [f"run.output_dir={out}", "run.total_steps=6", "checkpoint.every_steps=3",
                                              "evaluation.before_after=false", "logging.progress_bar=false"]))
    return out


@pytest.fixture(scope="module")
def demo_eval(demo_run, tmp_path_factory) -> Path:
    """`detoxrl-eval RUN_DIR` (start vs final) on the short demo run, through the command-line entry point."""
    out = tmp_path_factory.mktemp("demo_eval")
    assert cli.main([str(demo_run), "--output", str(out), *EVAL_ARGS]) == 0
    return out


def _policy_metrics(folder: Path) -> list[dict]:
    return [p["metrics"] for p in json.loads((folder / "metrics.json").read_text())["policies"]]


# ---- pure metrics -----------------------------------------------------------------------------------------
def test_distinct_n_and_duplicates():
    texts = ["a b a b", "a b c"]
    assert M.distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert M.distinct_n(texts, 2) == pytest.approx(3 / 5)          # ab, ba, ab | ab, bc -> {ab, ba, bc}
    assert M.distinct_n(["a"], 2) is None
    assert M.duplicate_share(["x", "y", "x", "x"]) == pytest.approx(0.5)


def test_relative_improvement_and_paired_bootstrap():
    assert M.relative_improvement(0.2, 0.1) == pytest.approx(0.5)     # less toxic = positive improvement
    assert M.relative_improvement(0.0, 0.1) is None
    rng = np.random.default_rng(0)
    before = rng.uniform(0.3, 0.5, size=200)
    after = before * 0.5                                               # exactly 50% better on every prompt
    out = M.paired_bootstrap(before, after, M.mean_improvement, 500, 0.95, seed=1)
    assert out["value"] == pytest.approx(0.5)
    assert out["ci_low"] == pytest.approx(0.5) and out["ci_high"] == pytest.approx(0.5)  # paired: no spread
    noisy = M.paired_bootstrap(before, rng.uniform(0.1, 0.3, size=200), M.mean_improvement, 500, 0.95, seed=1)
    assert noisy["ci_low"] < noisy["value"] < noisy["ci_high"]
    assert M.paired_bootstrap(before, after, M.mean_improvement, 500, 0.95, seed=1) == out     # seeded
    assert M.summary([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2 ** 0.5)}


def test_rouge_against_references():
    r = M.rouge_per_sample(["the cat sat on the mat", "nothing alike"], ["the cat sat on the mat", "a dog barked"])
    assert r["rouge1"][0] == pytest.approx(1.0) and r["rougeL"][0] == pytest.approx(1.0)
    assert r["rouge1"][1] == 0.0 and set(r) == {"rouge1", "rouge2", "rougeL"}


def test_settings_come_from_the_recipe_and_can_be_overridden():
    cfg = load_config(RECIPES / "flan_t5_base_dialogsum_detox.yaml")
    s = settings_from_config(cfg)
    assert (s.split, s.num_samples, s.seed, s.toxic_label) == ("test", 10, 42, "hate")     # the seeds' evaluation
    assert s.max_new_tokens == 100 and s.generation.max_new_tokens_range is None           # low end of 100..400
    assert s.generation.do_sample and s.generation.top_k == 0 and s.generation.top_p == 1.0
    g = settings_from_config(cfg, do_sample=False, max_new_tokens=50, top_p=0.9, num_samples=None)
    assert not g.generation.do_sample and g.max_new_tokens == 50 and g.generation.top_p == 0.9 and g.num_samples == 10
    assert cfg.generation.do_sample and cfg.generation.top_p == 1.0                         # the recipe is untouched


# ---- which policies ---------------------------------------------------------------------------------------
def test_policy_specs_resolve(tiny_run, test_models, tmp_path):
    run = RunContext.load(tiny_run)
    start = resolve_policy("start", run)
    assert start.adapter == str(test_models["t5_sft_adapter"]) and start.step == 0   # base + starting adapter
    assert start.base_path == str(test_models["t5"]) and start.kind == "seq2seq"
    final = resolve_policy("final", run)
    assert final.adapter == str(tiny_run / "final") and final.step == 2
    ckpt = resolve_policy("step-1", run)
    assert ckpt.adapter == str(tiny_run / "checkpoints" / "step-000001") and ckpt.label == "step-1"
    assert resolve_policy("1", run).adapter == ckpt.adapter
    as_run = resolve_policy(str(tiny_run))                                   # another run directory: its final/
    assert as_run.adapter == final.adapter and as_run.base_path == final.base_path and as_run.source == "run"
    folder = resolve_policy(f"mine={tiny_run / 'checkpoints' / 'step-000002'}")  # a checkpoint folder: its run's base
    assert folder.label == "mine" and folder.step == 2 and folder.base_path == str(test_models["t5"])
    explicit = resolve_policy(f"{test_models['t5']}+{test_models['t5_sft_adapter']}")
    assert explicit.base == str(test_models["t5"]) and explicit.adapter == str(test_models["t5_sft_adapter"])
    merged = resolve_policy(str(test_models["t5"]))
    assert merged.source == "merged" and merged.adapter is None
    with pytest.raises(FileNotFoundError, match="step-000001"):
        resolve_policy("step-7", run)                                         # lists the checkpoints there
    with pytest.raises(ValueError, match="no run directory"):
        resolve_policy("final")
    with pytest.raises(FileNotFoundError):
        resolve_policy(str(tmp_path))                                         # an empty folder is nothing
    sources = [resolve_policy("final", run), resolve_policy("final", run), resolve_policy("start", run, "a b/c")]
    unique_labels(sources)
    assert [s.label for s in sources] == ["final", "final-2", "a_b_c"]
    assert final.identity()["adapter_sha256"] != start.identity()["adapter_sha256"]


# ---- the report -------------------------------------------------------------------------------------------
def test_report_files_exist_and_parse(demo_eval):
    doc = json.loads((demo_eval / "metrics.json").read_text())
    assert doc["schema_version"] == 1 and doc["baseline"] == "start"
    assert [p["label"] for p in doc["policies"]] == ["start", "final"]
    s = doc["settings"]
    assert s["split"] == "test" and s["num_samples_used"] == 12 and s["batch_size"] == 5 and s["world_size"] == 1
    assert s["generation"]["do_sample"] is True and s["max_new_tokens"] == 24   # the recipe's
    assert s["toxicity"]["label"] == "hate" and s["toxicity"]["from_reward_term"] == 0
    assert s["reward_terms"][0]["label"] == "nothate" and s["packages"]["torch"]
    assert [(j["name"], j["label"]) for j in s["judges"]] == [("demo-judge", "toxic")] and "flags" in doc
    for p in doc["policies"]:
        ident, m = p["identity"], p["metrics"]
        assert ident["base_path"] and ident["base_sha256"] and ident["kind"] == "seq2seq"
        assert set(m) >= {"num_samples", "toxicity", "reward", "reward_terms", "rouge", "response_length",
                          "distinct", "duplicate_share", "kl_to_baseline"}
        assert set(m["toxicity"]) == {"mean", "std", "share_above_0.5", "mean_interval"}
        assert 0 <= m["toxicity"]["mean"] <= 1
        iv = m["toxicity"]["mean_interval"]
        assert iv["value"] == pytest.approx(m["toxicity"]["mean"]) and iv["ci_low"] <= iv["value"] <= iv["ci_high"]
        judge = m["judges"]["demo-judge"]                                  # the demo's independent judge
        assert judge["mean_interval"]["ci_low"] <= judge["mean"] <= judge["mean_interval"]["ci_high"]
        assert 0 <= judge["reward_clean_judge_toxic"]["share"] <= 1
        assert set(m["rouge"]) == {"rouge1", "rouge2", "rougeL"}
        assert m["response_length"]["mean_tokens"] > 0 and 0 < m["distinct"]["distinct_1"] <= 1
    assert doc["policies"][0]["identity"]["adapter"] is None              # the demo starts from a fresh LoRA
    assert doc["policies"][1]["identity"]["adapter_sha256"] and doc["policies"][1]["identity"]["step"] == 6
    start, final = _policy_metrics(demo_eval)
    assert start["kl_to_baseline"] == {"mean": 0.0, "std": 0.0}
    assert final["kl_to_baseline"]["mean"] != 0.0
    vs = final["vs_baseline"]
    for key in ("toxicity_mean_improvement", "toxicity_std_improvement", "reward_mean_change"):
        assert vs[key]["ci_low"] <= vs[key]["value"] <= vs[key]["ci_high"], (key, vs[key])
    assert vs["reward_mean_change"]["value"] == pytest.approx(final["reward"]["mean"] - start["reward"]["mean"])

    with (demo_eval / "samples.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12
    cols = set(rows[0])
    assert cols >= {"index", "prompt", "reference", "response_start", "response_final", "reward_start",
                    "reward_final", "toxicity_start", "toxicity_final", "kl_final", "reward_diff_final",
                    "toxicity_diff_final", "judge_demo-judge_start", "judge_demo-judge_final"}
    diffs = [float(r["reward_diff_final"]) for r in rows]
    assert diffs == sorted(diffs, reverse=True)                            # sorted by reward difference
    for r in rows:
        assert float(r["reward_diff_final"]) == pytest.approx(float(r["reward_final"]) - float(r["reward_start"]),
                                                              abs=1e-4)
    assert sorted(int(r["index"]) for r in rows) == list(range(12))

    md = (demo_eval / "samples.md").read_text()
    assert "| metric | start | final |" in md and "| toxicity mean P(hate) (reward model) [95% CI] |" in md
    assert "| judge demo-judge: toxicity mean P(toxic) [95% CI] |" in md and "ROUGE-L" in md

    page = (demo_eval / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and '<table class="metrics" id="metrics">' in page
    assert '<table id="samples">' in page and "toxicity mean P(hate)" in page and '<h2 id="judges">' in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 5                                                # reward, KL, beta, losses, length, ...
    assert all(base64.b64decode(i).startswith(PNG_MAGIC) for i in images)
    assert not re.search(r'(src|href)="(https?:)?//', page)                # self-contained: nothing external


def test_same_policy_twice_with_the_same_seed_gives_identical_numbers(demo_run, demo_eval, tmp_path):
    out = tmp_path / "again"
    assert cli.main([str(demo_run), "--output", str(out), "--policy", "start", "--policy", "final",
                     "--policy", "again=final", *EVAL_ARGS]) == 0
    start, final, again = _policy_metrics(out)
    assert again["toxicity"] == final["toxicity"] and again["reward"] == final["reward"]
    assert again["kl_to_baseline"] == final["kl_to_baseline"] and again["rouge"] == final["rouge"]
    assert again["vs_baseline"] == final["vs_baseline"]
    # and a second invocation reproduces the first one exactly
    assert [start, final] == _policy_metrics(demo_eval)


def test_greedy_checkpoint_and_a_causal_policy_without_toxic_label(demo_run, test_models, tmp_path, capsys):
    out = tmp_path / "greedy"
    assert cli.main([str(demo_run), "--checkpoint", "3", "--greedy", "--output", str(out), *EVAL_ARGS]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert [p["label"] for p in doc["policies"]] == ["start", "step-3"]
    assert doc["settings"]["generation"]["do_sample"] is False and doc["settings"]["temperature_for_kl"] == 1.0

    # the sentiment recipe (causal, DistilBERT POSITIVE reward): no `hate` label, so no toxicity, and --config
    # without a run directory
    recipe = RECIPES / "gpt2_imdb_positive.yaml"
    over = recipe_overrides("gpt2_imdb_positive", test_models)
    out2 = tmp_path / "causal"
    assert cli.main(["--config", str(recipe), *over, "evaluation.split=test", "--policy", f"base={test_models['gpt2']}",
                     "--policy", f"same={test_models['gpt2']}", "--output", str(out2), *EVAL_ARGS]) == 0
    doc = json.loads((out2 / "metrics.json").read_text())
    base, same = [p["metrics"] for p in doc["policies"]]
    assert base["toxicity"] is None and "skipped" in doc["settings"]["toxicity"]
    assert base["rouge"] is None                                           # IMDb has no reference column
    assert same["kl_to_baseline"]["mean"] == pytest.approx(0.0, abs=1e-6) and base["reward"] == same["reward"]
    # naming a label the classifier lacks is an error that lists its labels; so is a split that does not exist
    assert cli.main(["--config", str(recipe), *over, "--policy", str(test_models["gpt2"]), "--toxic-label", "hate",
                     "--output", str(tmp_path / "x"), *EVAL_ARGS]) == 2
    assert "'NEGATIVE', 'POSITIVE'" in capsys.readouterr().err
    assert cli.main([str(demo_run), "--split", "nope", *EVAL_ARGS]) == 2
    assert "nope" in capsys.readouterr().err


def test_plot_command_writes_pngs(demo_run, tmp_path):
    assert cli.main(["plot", str(demo_run), "--output", str(tmp_path)]) == 0
    names = {p.name for p in tmp_path.glob("*.png")}
    assert {"reward.png", "kl.png", "kl_coef.png", "losses.png", "response_length.png", "throughput.png"} <= names
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in tmp_path.glob("*.png"))
    assert cli.main(["plot", str(tmp_path)]) == 2                          # no event files: a clear error


# ---- correctness guard --------------------------------------------------------------------------------------
def test_response_is_scored_when_the_prompt_is_longer_than_the_classifier_window(demo_assets):
    """What eval scores is the response (with the prompt cut from the LEFT for prompt_response terms): behind a
    prompt several times the classifier's window, a toxic and a clean response still score differently."""
    cfg = RewardTermConfig(model="demo", label="nothate", output="logit", score="prompt_response")
    term = RewardTerm(cfg, str(demo_assets["reward"]), torch.device("cpu"), torch.float32)
    prompt = "Summarize the following conversation.\n\n" + "#Person1#: hello. #Person2#: hi there. " * 80
    assert len(term.tokenizer(prompt)["input_ids"]) > 3 * term.max_length
    clean, toxic = "#Person1# thanks #Person2# for the lunch.", "you are a stupid worthless idiot"
    out = score_responses([term], (term, "hate"), [prompt, prompt], [clean, toxic])
    assert out["reward"][0] > out["reward"][1] + 1.0                       # nothate logit: clean >> toxic
    assert out["toxicity"][1] > 0.5 > out["toxicity"][0]
    assert out["terms"][0] == out["reward"]


def test_eval_refuses_non_finite_reward_scores_as_training_does(demo_assets, monkeypatch):
    """detoxrl-eval sums the reward with RewardModel.score, whose guard makes a NaN score an error (never a number
    in the report)."""
    cfg = RewardTermConfig(model="demo", label="nothate", output="logit", score="response")
    term = RewardTerm(cfg, str(demo_assets["reward"]), torch.device("cpu"), torch.float32)
    real = term.logits  # what RewardModel.score reads (through submit_logits)

    def nan_on_row_1(prompts, responses, with_prompt):
        logits = real(prompts, responses, with_prompt).clone()
        logits[1] = float("nan")
        return logits

    monkeypatch.setattr(term, "logits", nan_on_row_1)
    with pytest.raises(FloatingPointError, match="non-finite"):
        score_responses([term], (term, "hate"), ["a", "b"], ["thanks for the lunch", "you idiot"])


# ---- the demo's claim ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_of_the_demo_run_shows_the_improvement_the_demo_claims(shipped_demo_run, tmp_path):
    """The demo recipe as shipped, then `detoxrl-eval` on it: toxicity clearly down (the README claims about -85%;
    checked as after < 0.5 x before), with a bootstrap interval above zero, the reward up, a measured KL to the
    start, summaries that are still summaries (ROUGE-L kept within 30% of the start's), and the same figures the
    trainer printed."""
    _, run_dir = shipped_demo_run
    run = RunContext.load(run_dir)
    settings = settings_from_config(run.cfg, progress=False)
    result = evaluate(run.cfg, [resolve_policy("start", run), resolve_policy("final", run)], settings,
                      tmp_path / "eval", run_dir)
    start, final = [p["metrics"] for p in result.metrics["policies"]]
    assert final["toxicity"]["mean"] < 0.5 * start["toxicity"]["mean"], (start["toxicity"], final["toxicity"])
    assert final["rouge"]["rougeL"] > 0.7 * start["rouge"]["rougeL"], (start["rouge"], final["rouge"])
    imp = final["vs_baseline"]["toxicity_mean_improvement"]
    assert imp["value"] > 0.3 and imp["ci_low"] > 0, imp
    assert final["vs_baseline"]["reward_mean_change"]["ci_low"] > 0
    assert start["kl_to_baseline"]["mean"] == 0.0 and final["kl_to_baseline"]["mean"] > 0.0
    assert start["rouge"]["rougeL"] > 0 and final["rouge"]["rougeL"] > 0
    # one evaluator: the trainer's printed before/after are these very figures (same samples, same seeds)
    ba = json.loads((run_dir / "eval_before_after.json").read_text())
    draws = run.cfg.evaluation.samples_per_prompt
    assert draws > 1 and start["num_samples"] == ba["before"]["num_samples"] == run.cfg.evaluation.num_samples * draws
    for policy, when in ((start, "before"), (final, "after")):
        assert policy["toxicity"]["mean"] == pytest.approx(ba[when]["toxicity_mean"], abs=1e-6), when
        assert policy["reward"]["mean"] == pytest.approx(ba[when]["reward_mean"], abs=1e-5), when
        assert policy["judges"]["demo-judge"]["mean"] == pytest.approx(ba[when]["judges"]["demo-judge"]["mean"],
                                                                       abs=1e-6), when


# ---- 2 processes -------------------------------------------------------------------------------------------
def _free_port() -> int:
    # not accelerate's default 29500: other runs on the machine may hold it
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.distributed
def test_two_process_eval_matches_one_process(demo_run, demo_eval, tmp_path):
    out = tmp_path / "two"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "detoxrl.eval",
           str(demo_run), "--output", str(out), *EVAL_ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["settings"]["world_size"] == 2                             # really two ranks (ARCHITECTURE.md traps)
    assert _policy_metrics(out) == _policy_metrics(demo_eval)
    assert (out / "samples.csv").read_text() == (demo_eval / "samples.csv").read_text()


# ---- the report in a real browser --------------------------------------------------------------------------
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        if subprocess.run(install, env=env, capture_output=True, timeout=900).returncode != 0:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
            subprocess.run(install, env=env, capture_output=True, timeout=900)
        if shutil.which("chromium"):
            return shutil.which("chromium")
        pytest.skip("Chromium is not installed and `apt-get install chromium` failed (no network?)")
    pytest.skip("Chromium is not installed and cannot be installed here (needs root and apt-get)")


RENDER_PROBE = """<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.map.call(document.images, function (i) {
    return [i.naturalWidth, i.naturalHeight, Math.round(i.getBoundingClientRect().height)]; });
  var t = document.getElementById("metrics").getBoundingClientRect();
  document.body.setAttribute("data-render", JSON.stringify({imgs: imgs, table: [t.width, t.height],
    rows: document.querySelectorAll("#metrics tbody tr").length,
    samples: document.querySelectorAll("#samples tbody tr").length}));
});
</script>"""


@pytest.mark.slow
def test_report_renders_in_headless_chromium(demo_eval, tmp_path):
    browser = _chromium()
    page = (demo_eval / "report.html").read_text()
    probe = tmp_path / "report.html"          # a copy with a script that records what the browser laid out
    probe.write_text(page.replace("</body>", RENDER_PROBE + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2000"]
    dom = subprocess.run([browser, *flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)
    m = re.search(r'data-render="([^"]+)"', dom.stdout)
    assert m, f"no render record in the DOM; stderr: {dom.stderr[-2000:]}"
    render = json.loads(m.group(1).replace("&quot;", '"'))
    n_images = page.count("data:image/png;base64,")
    assert len(render["imgs"]) == n_images >= 5
    assert all(w > 100 and h > 100 and shown > 100 for w, h, shown in render["imgs"]), render["imgs"]
    assert render["table"][0] > 200 and render["table"][1] > 100 and render["rows"] >= 10
    assert render["samples"] == 12
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", (demo_eval / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 20_000


# ---- detoxrl-eval compare -----------------------------------------------------------------------------------
COMPARE_PROBE = """<script>
window.addEventListener("load", function () {
  var img = document.getElementById("curves");
  document.body.setAttribute("data-render", JSON.stringify({img: [img.naturalWidth, img.naturalHeight,
    Math.round(img.getBoundingClientRect().width)],
    settings: document.querySelectorAll("#settings tbody tr").length,
    responses: document.querySelectorAll("#responses tbody tr").length,
    final: document.querySelectorAll("#final tbody tr").length}));
});
</script>"""


@pytest.mark.slow
def test_compare_of_the_demo_and_the_over_optimised_run_renders_in_chromium(shipped_demo_run, over_optimised_run,
                                                                            tmp_path):
    _, demo_dir = shipped_demo_run
    _, hot_dir = over_optimised_run
    out = tmp_path / "compare"
    assert cli.main(["compare", str(demo_dir), str(hot_dir), "--output", str(out)]) == 0
    doc = json.loads((out / "compare.json").read_text())
    demo, hot = doc["runs"]
    diff = doc["settings_diff"]
    assert {"optim.lr", "ppo.kl.init_coef", "ppo.kl.adaptive", "alarms.action"} <= set(diff)
    assert diff["optim.lr"] == [3e-4, 3e-3] and "policy.model" not in diff      # only what differs
    assert demo["alarms_first_fired"] == {} and hot["alarms_first_fired"]      # the alarm shows in the comparison
    for label in (demo["label"], hot["label"]):                               # both curves, every panel
        assert {"env/reward_mean", "judge/demo-judge/toxicity", "objective/kl", "objective/entropy",
                "env/response_length_mean", "perf/samples_per_s"} <= set(doc["curves"][label])
    assert len(doc["curves"][hot["label"]]["objective/kl"]["steps"]) == hot["steps"] < demo["steps"] == 60
    f = demo["final"]
    for phase in ("before", "after"):
        for m in (f[phase]["toxicity"], f[phase]["judges"]["demo-judge"], f[phase]["reward"]):
            assert m["ci_low"] <= m["value"] <= m["ci_high"]
    assert "after" not in hot["final"] and hot["final"]["before"] == f["before"]   # same prompts, same start
    rows = doc["responses"]
    assert len(rows) == 12 and all(r[demo["label"]]["response"] is not None and r[hot["label"]] is None
                                   for r in rows)

    browser = _chromium()
    page = (out / "compare.html").read_text()
    assert not re.search(r'(src|href)="(https?:)?//', page)
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", COMPARE_PROBE + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--window-size=1400,2000"]
    dom = subprocess.run([browser, *flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120)
    m = re.search(r'data-render="([^"]+)"', dom.stdout)
    assert m, f"no render record in the DOM; stderr: {dom.stderr[-2000:]}"
    render = json.loads(m.group(1).replace("&quot;", '"'))
    assert render["img"][0] > 600 and render["img"][1] > 300 and render["img"][2] > 600
    assert render["settings"] == len(diff) and render["responses"] == 12 and render["final"] == 3


def test_console_scripts_exist():
    bindir = Path(sys.executable).parent
    for name in ("detoxrl-eval", "detoxrl-export"):
        proc = subprocess.run([str(bindir / name), "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (name, proc.stderr[-2000:])
    for sub in ("plot", "compare"):
        proc = subprocess.run([str(bindir / "detoxrl-eval"), sub, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and f"detoxrl-eval {sub}" in proc.stdout
