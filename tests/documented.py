"""The launch commands the documentation shows, read from the shipped accelerate configs' header comments.

Each file under configs/accelerate states its commands as `#   GPU: accelerate launch ...` and
`#   CPU: accelerate launch ...`. Tests run the CPU ones as written (tests/test_accelerate_configs.py,
tests/test_distributed.py), so the documentation and what is tested cannot drift apart.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_DIR = REPO / "configs" / "accelerate"
HEADER = re.compile(r"^#\s+(GPU|CPU): (.+)$")


def documented_commands(path: Path) -> dict[str, str]:
    """{'GPU': command, 'CPU': command} from a config file's header comment."""
    found = {}
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        m = HEADER.match(line)
        if m:
            found[m.group(1)] = m.group(2).strip()
    return found


def split_command(command: str) -> tuple[dict[str, str], list[str]]:
    """(leading VAR=value assignments, the arguments after `accelerate launch`)."""
    words = shlex.split(command)
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[:2] == ["accelerate", "launch"], command
    return env, words[2:]


def cpu_launch(strategy: str, accelerate: str, recipe: Path, port: int, *, extra_flags: list[str] = (),
               replace: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, environment additions) of a strategy's documented CPU command: RECIPE becomes `recipe`, `replace`
    substitutes placeholder arguments ($NODE_RANK...), `extra_flags` go before `-m` (test-only launcher flags)."""
    env, args = split_command(documented_commands(ACCELERATE_DIR / f"{strategy}.yaml")["CPU"])
    args = [(replace or {}).get(a, a) for a in args]
    args[args.index("RECIPE")] = str(recipe)
    m = args.index("-m")
    args[m:m] = list(extra_flags)
    if "--main_process_port" not in args:
        args[m:m] = ["--main_process_port", str(port)]
    return [accelerate, "launch", *args], env
