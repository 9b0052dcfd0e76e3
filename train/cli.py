"""`detoxrl-train` / `python -m detoxrl.train` / `accelerate launch -m detoxrl.train`.

    detoxrl-train                                   # the offline demo (configs/ppo/demo.yaml's settings)
    detoxrl-train --config configs/ppo/flan_t5_base_dialogsum_detox.yaml ppo.batch_size=32 run.output_dir=runs/x
    detoxrl-train --config RECIPE --print-config    # the fully resolved config as YAML, then exit
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detoxrl.train.config import ConfigError, load_config, to_yaml
from detoxrl.train.errors import InputError, report

DEMO_RECIPE = Path(__file__).resolve().parent / "demo_recipe.yaml"
# 75 = EX_TEMPFAIL ("temporary failure, try again"): running the same command again resumes.
EXIT_CONFIG_ERROR, EXIT_NONFINITE, EXIT_STOPPED, EXIT_ABORTED = 2, 3, 75, 130
# 76: an alarm with alarms.action=stop ended the run after a checkpoint (look before resuming: docs/alarms.md).
EXIT_ALARM = 76
# 4: a scorer process (reward.placement / reference.placement: scorer) died, hung or could not start.
EXIT_SCORER = 4

EPILOG = f"""\
overrides: section.key=value (YAML values), e.g. ppo.kl.target=3 'reward.terms.0.label=nothate'
  generation.max_new_tokens_range=[100,400]. Every key is documented in docs/CONFIG.md.

resume: a run continues from the newest complete checkpoint in run.output_dir/checkpoints
  (checkpoint.resume=auto, the default); checkpoint.resume=never starts afresh; a path picks one.

stopping: SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 make every process finish the current step, write a
  checkpoint and exit with status {EXIT_STOPPED}; run the same command again to resume. A second Ctrl-C
  aborts at once (status {EXIT_ABORTED}); a kill -9 loses only the steps since the last checkpoint. A job
  started in the background (`cmd &`, nohup), which its shell hands SIGINT ignored, keeps ignoring it.

exit status: 0 finished; {EXIT_CONFIG_ERROR} config, launch or input error (a key, launch flag, data file,
  line, column or model that is wrong: one line says which and how to fix it; --debug adds the traceback);
  {EXIT_NONFINITE} too many non-finite losses; {EXIT_SCORER} a scorer died, hung or did not start (after a
  checkpoint of the last finished step); {EXIT_STOPPED} stopped by a signal after writing a checkpoint;
  {EXIT_ALARM} stopped by a reward-hacking alarm (alarms.action=stop) after writing a checkpoint;
  {EXIT_ABORTED} aborted by a second Ctrl-C."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="detoxrl-train", description="PPO fine-tuning of a LoRA policy against frozen "
                                "reward classifiers. Without --config it runs the offline demo.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--config", type=Path, default=None, help="YAML recipe (default: the offline demo recipe)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--debug", action="store_true", help="print the traceback of a config or input error too")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, applied after the YAML file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config or DEMO_RECIPE, args.overrides)
    except ConfigError as err:
        return report("detoxrl-train", err, args.debug)
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        return 0
    from detoxrl.train.loop import NonFiniteLossError, train
    from detoxrl.train.scorers import ScorerError

    try:
        result = train(cfg)
    except (ConfigError, InputError) as err:  # a launch problem, or a data file, line, column or model that is wrong
        return report("detoxrl-train", err, args.debug)
    except ScorerError as err:  # one line naming the scorer and its log (and the checkpoint written)
        print(f"detoxrl-train: scorer error: {err}", file=sys.stderr)
        return EXIT_SCORER
    except NonFiniteLossError as err:
        print(f"detoxrl-train: {err}", file=sys.stderr)
        return EXIT_NONFINITE
    except KeyboardInterrupt as err:
        print(f"detoxrl-train: aborted ({err or 'Ctrl-C'}); steps since the last checkpoint are lost", file=sys.stderr)
        return EXIT_ABORTED
    if not result.is_main:  # one summary line per run, not one per rank
        return EXIT_ALARM if result.alarm_stop else (EXIT_STOPPED if result.stopped_by else 0)
    if result.alarm_stop:
        print(f"stopped by {result.stopped_by} after step {result.steps_done} (alarms.action=stop); checkpoint "
              f"written. Inspect the run (samples.jsonl, docs/alarms.md) before resuming it")
        return EXIT_ALARM
    if result.stopped_by:
        print(f"stopped by {result.stopped_by} after step {result.steps_done}; checkpoint written, run the same "
              f"command again to resume")
        return EXIT_STOPPED
    print(f"done: {result.steps_done} steps; adapter + value head in {result.final_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
