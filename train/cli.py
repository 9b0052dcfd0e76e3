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

DEMO_RECIPE = Path(__file__).resolve().parent / "demo_recipe.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="detoxrl-train", description="PPO fine-tuning of a LoRA policy against frozen "
                                "reward classifiers. Without --config it runs the offline demo.",
                                epilog="Overrides: section.key=value (YAML values), e.g. ppo.kl.target=3 "
                                "'reward.terms.0.label=nothate' generation.max_new_tokens_range=[100,400]. "
                                "Every key is documented in docs/CONFIG.md.")
    p.add_argument("--config", type=Path, default=None, help="YAML recipe (default: the offline demo recipe)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, applied after the YAML file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config or DEMO_RECIPE, args.overrides)
    except ConfigError as err:
        print(f"detoxrl-train: config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(to_yaml(cfg))
        return 0
    from detoxrl.train.loop import NonFiniteLossError, train

    try:
        result = train(cfg)
    except NonFiniteLossError as err:
        print(f"detoxrl-train: {err}", file=sys.stderr)
        return 3
    print(f"done: {result.steps_done} steps; adapter + value head in {result.final_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
