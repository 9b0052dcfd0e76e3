"""`detoxrl-eval` / `python -m detoxrl.eval` / `accelerate launch -m detoxrl.eval`.

    detoxrl-eval RUN_DIR                          # the run's starting policy vs its final one -> RUN_DIR/eval/
    detoxrl-eval RUN_DIR --checkpoint 20          # ... vs its checkpoint step-000020
    detoxrl-eval RUN_DIR --policy start --policy final --policy other=runs/other --greedy --num-samples 100
    detoxrl-eval RUN_DIR data.dataset=/data/dialogsum   # recipe overrides (section.key=value), e.g. moved data
    detoxrl-eval --config RECIPE --policy google/flan-t5-base --policy BASE+ADAPTER --output DIR
    detoxrl-eval plot RUN_DIR [--output DIR]      # PNG training curves from the run's TensorBoard files
    detoxrl-eval compare RUN_DIR RUN_DIR... [--output DIR]   # runs side by side: compare.html + compare.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from detoxrl.train.config import ConfigError, load_config
from detoxrl.train.errors import report


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="detoxrl-eval",
        description="Compare policies on the same held-out prompts with the same sampling seed: toxicity, reward "
                    "terms, ROUGE, length, distinct-n and KL, with bootstrap intervals; writes metrics.json, "
                    "samples.csv, samples.md and report.html. `detoxrl-eval plot RUN_DIR` draws training curves.",
        epilog="Policy specs: start | final | step-N | RUN_DIR | ADAPTER_DIR | BASE+ADAPTER_DIR | MODEL_DIR_OR_HUB_NAME, "
               "optionally prefixed with LABEL=. The first policy is the baseline that improvements and KL are "
               "measured against.")
    p.add_argument("run_dir", nargs="?", type=Path, help="training run directory (its config.yaml is the recipe)")
    p.add_argument("overrides", nargs="*", help="recipe overrides section.key=value (e.g. data.dataset=PATH)")
    p.add_argument("--config", type=Path, help="recipe YAML to use instead of (or without) the run's config.yaml")
    p.add_argument("--output", "-o", type=Path, help="output folder (default RUN_DIR/eval)")
    p.add_argument("--policy", action="append", default=None, metavar="[LABEL=]SPEC",
                   help="a policy to evaluate (repeat; the first is the baseline). Default: start and final")
    p.add_argument("--checkpoint", metavar="N", help="compare the start against checkpoint step N instead of final/")
    p.add_argument("--split", help="data split of the prompts (default: the recipe's evaluation.split, e.g. test)")
    p.add_argument("--num-samples", "-n", type=int, help="number of prompts (default: evaluation.num_samples)")
    p.add_argument("--samples-per-prompt", type=int,
                   help="responses sampled per prompt (default: evaluation.samples_per_prompt)")
    p.add_argument("--seed", type=int, help="sampling seed (default: run.seed)")
    p.add_argument("--batch-size", type=int, help="prompts per generate() call (default: "
                   "generation.rollout_batch_size); part of what fixes the samples")
    p.add_argument("--max-new-tokens", type=int, help="max response tokens (default: generation.max_new_tokens, or the "
                   "low end of generation.max_new_tokens_range: 100 for the seeds' 100..400)")
    p.add_argument("--min-new-tokens", type=int, help="min response tokens (default: generation.min_new_tokens)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--temperature", type=float)
    p.add_argument("--classifier", help="toxicity classifier (hub name or folder; default: the recipe's reward term "
                   "evaluation.term)")
    p.add_argument("--toxic-label", help="label whose probability is the toxicity (default: evaluation.toxic_label)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the intervals (0 = none)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals")
    p.add_argument("--device", choices=["auto", "cpu"], default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="print the traceback of a config or input error too")
    return p


def _plot_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detoxrl-eval plot", description="PNG plots of a run's training curves "
                                "(reward, KL, KL coefficient, losses, response length, throughput, policy "
                                "statistics) from its TensorBoard event files.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--output", "-o", type=Path, help="folder for the PNGs (default RUN_DIR/plots)")
    return p


def plot_main(argv: list[str]) -> int:
    from detoxrl.eval.plots import write_plots

    args = _plot_parser().parse_args(argv)
    try:
        paths = write_plots(args.run_dir, args.output)
    except FileNotFoundError as err:
        print(f"detoxrl-eval plot: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def _compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="detoxrl-eval compare", description="Training runs side by side: the settings "
                                "that differ, overlaid curves (reward, judge toxicity, KL, entropy, length, samples/s), "
                                "the held-out before/after with intervals, alarms, and the responses to the same "
                                "held-out prompts. Writes compare.html and compare.json.")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--output", "-o", type=Path, default=Path("compare"), help="output folder (default ./compare)")
    return p


def compare_main(argv: list[str]) -> int:
    from detoxrl.eval.compare import compare_runs

    args = _compare_parser().parse_args(argv)
    try:
        doc = compare_runs(args.run_dirs, args.output)
    except (FileNotFoundError, ValueError) as err:
        print(f"detoxrl-eval compare: {err}", file=sys.stderr)
        return 2
    for r in doc["runs"]:
        fired = ", ".join(f"{k} @ step {v}" for k, v in sorted(r["alarms_first_fired"].items(),
                                                                key=lambda kv: kv[1])) or "no alarm"
        print(f"{r['label']}: {r['steps']} steps; {fired}")
    print(f"comparison: {args.output / 'compare.html'}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plot":
        return plot_main(argv[1:])
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    parser = _eval_parser()
    args = parser.parse_intermixed_args(argv)  # overrides may come after options
    if args.run_dir is not None and "=" in str(args.run_dir) and not args.run_dir.exists():
        args.overrides.insert(0, str(args.run_dir))  # `--config R key=value`: the first override landed here
        args.run_dir = None

    from detoxrl.eval.evaluate import evaluate, settings_from_config
    from detoxrl.eval.policies import RunContext, resolve_policy, unique_labels

    try:
        run = RunContext.load(args.run_dir) if args.run_dir is not None else None
        recipe = args.config or (run.run_dir / "config.yaml" if run else None)
        if recipe is None:
            parser.error("give a RUN_DIR, or --config RECIPE with --policy and --output")
        cfg = load_config(recipe, args.overrides)
        if run is not None:
            run = RunContext(run.run_dir, cfg)
        specs = args.policy or (["start", f"step-{args.checkpoint}" if args.checkpoint else "final"])
        if args.policy and args.checkpoint:
            parser.error("use either --policy or --checkpoint")
        output = args.output or (run.run_dir / "eval" if run else None)
        if output is None:
            parser.error("--output is required without a RUN_DIR")
        sources = [resolve_policy(s, run) for s in specs]
        unique_labels(sources)
        settings = settings_from_config(
            cfg, split=args.split, num_samples=args.num_samples, samples_per_prompt=args.samples_per_prompt,
            seed=args.seed, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
            do_sample=False if args.greedy else None, top_k=args.top_k, top_p=args.top_p,
            temperature=args.temperature, classifier=args.classifier, toxic_label=args.toxic_label,
            toxicity_required=bool(args.classifier or args.toxic_label), bootstrap=args.bootstrap,
            confidence=args.confidence, device=args.device, progress=not args.no_progress)
    except (ConfigError, FileNotFoundError, ValueError) as err:  # InputError (a model, file or line) is a ValueError
        return report("detoxrl-eval", err, args.debug)
    try:
        result = evaluate(cfg, sources, settings, output, run.run_dir if run else None)
    except (FileNotFoundError, KeyError, ValueError) as err:  # a wrong split, column, label, path, model or line
        return report("detoxrl-eval", err, args.debug)
    if result is not None:
        from detoxrl.eval.report import markdown_table, metric_table, settings_summary

        header, rows = metric_table(result.metrics)
        print(settings_summary(result.metrics))
        print(markdown_table(header, rows))
        print(f"report: {output / 'report.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
