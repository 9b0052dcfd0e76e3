"""Throughput, memory and learning-per-step benchmarks of detoxrl against the seeds' loop and TRL 1.12's PPO.

Entry points: `python -m benchmarks.ppo_throughput`, `python -m benchmarks.reward_curves` and
`python -m benchmarks.learning`; see the README, section Benchmarks.
Not part of the detoxrl distribution; run from the repository root.
"""

import os
import sys
from typing import TextIO


def json_only_stdout() -> TextIO:
    """A stream on the real stdout for the harness's JSON; everything else printed to stdout (libraries' chatter)
    goes to stderr from here on, so that stdout can be piped into a JSON reader."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.stdout.flush()
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return json_out
