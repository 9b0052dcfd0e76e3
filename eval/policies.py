"""Which policies to compare, resolved to (base model, optional LoRA adapter), and loaded for inference.

A policy spec (`--policy [LABEL=]SPEC`) is one of:

    start                 the run's starting policy: its base model, plus its starting adapter if it had one
    final                 the run's final adapter (RUN_DIR/final)
    step-N | N            the run's checkpoint RUN_DIR/checkpoints/step-N
    RUN_DIR               another run's final adapter, on that run's base model
    ADAPTER_DIR           a PEFT adapter folder (e.g. a checkpoint); its base is the model of the run the folder
                          belongs to, else `base_model_name_or_path` in its adapter_config.json
    BASE+ADAPTER_DIR      an explicit base model (hub name or folder) with a PEFT adapter folder
    MODEL                 a merged model: a local folder with config.json (e.g. from detoxrl-export) or a hub name

The same resolution serves `detoxrl-export`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from detoxrl.train import assets
from detoxrl.train.config import Config, load_config
from detoxrl.train.models import detect_kind, load_base_model, load_tokenizer

STEP_SPEC = re.compile(r"^(?:step-?)?(\d+)$")


@dataclass
class RunContext:
    """A training run directory and its resolved config."""
    run_dir: Path
    cfg: Config

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunContext":
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir} is not a detoxrl run directory (no config.yaml)")
        return cls(run_dir, load_config(run_dir / "config.yaml"))


def enclosing_run(folder: Path) -> Optional[RunContext]:
    """The run a folder such as RUN_DIR/final or RUN_DIR/checkpoints/step-N belongs to, if any."""
    for candidate in (folder.parent, folder.parent.parent):
        if (candidate / "config.yaml").is_file() and ((candidate / "final").is_dir()
                                                      or (candidate / "checkpoints").is_dir()):
            try:
                return RunContext.load(candidate)
            except Exception:  # not a config of ours
                return None
    return None


@dataclass
class PolicySource:
    """Where one policy comes from. `base` is as named (hub name, path or `demo`); `base_path` is loadable."""
    label: str
    spec: str
    source: str                      # start | final | checkpoint | run | adapter | merged
    base: str
    base_path: str
    adapter: Optional[str]
    kind: str
    tokenizer_path: str
    step: Optional[int] = None
    run_dir: Optional[str] = None
    revision: Optional[str] = None
    trust_remote_code: bool = False
    quantization: Optional[str] = None   # the run's policy.quantization (8bit / 4bit, GPU only) for evaluation

    def identity(self) -> dict[str, Any]:
        """What exactly was evaluated: names, paths and content hashes of the weights that are local files."""
        out = asdict(self)
        out["adapter_sha256"] = _weights_hash(Path(self.adapter)) if self.adapter else None
        out["base_sha256"] = _weights_hash(Path(self.base_path)) if Path(self.base_path).is_dir() else None
        return out


def _weights_hash(folder: Path) -> Optional[str]:
    files = sorted(p for p in folder.glob("*.safetensors") if p.name != "value_head.safetensors") or \
        sorted(folder.glob("*.bin"))
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file()


def _from_run(run: RunContext, label: str, spec: str, source: str, adapter: Optional[Path],
              step: Optional[int]) -> PolicySource:
    p = run.cfg.policy
    base_path = assets.resolve(p.model, "policy")
    kind = detect_kind(base_path, p.kind, p.revision, p.trust_remote_code)
    tok = str(adapter) if adapter is not None and _has_tokenizer(adapter) else base_path
    return PolicySource(label, spec, source, p.model, base_path, str(adapter) if adapter else None, kind, tok, step,
                        str(run.run_dir), p.revision, p.trust_remote_code, getattr(p, "quantization", None))


def _final_step(run: RunContext) -> int:
    metrics = run.run_dir / "metrics.jsonl"
    if metrics.is_file():
        lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
        if lines:
            return int(json.loads(lines[-1]).get("step", run.cfg.run.total_steps))
    return run.cfg.run.total_steps


def _adapter_source(label: str, spec: str, adapter: Path, base: Optional[str],
                    run: Optional[RunContext]) -> PolicySource:
    owner = enclosing_run(adapter)
    if base is None and owner is not None:
        step, source = None, "adapter"
        m = STEP_SPEC.match(adapter.name)
        if m and adapter.parent.name == "checkpoints":
            step, source = int(m.group(1)), "checkpoint"
        elif adapter.name == "final":
            step, source = _final_step(owner), "final"
        return _from_run(owner, label, spec, source, adapter, step)
    if base is None:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        base = cfg.get("base_model_name_or_path")
        if not base and run is not None:
            base = run.cfg.policy.model
        if not base:
            raise ValueError(f"policy {spec!r}: adapter {adapter} names no base model; use BASE+{adapter}")
    base_path = assets.resolve(base, "policy")
    kind = detect_kind(base_path, "auto")
    tok = str(adapter) if _has_tokenizer(adapter) else base_path
    return PolicySource(label, spec, "adapter", base, base_path, str(adapter), kind, tok)


def resolve_policy(spec: str, run: Optional[RunContext] = None, label: Optional[str] = None) -> PolicySource:
    """Turn a `--policy` spec into a PolicySource (see the module docstring for the forms)."""
    if label is None and "=" in spec and not Path(spec).exists():
        label, spec = spec.split("=", 1)
    default_label = label
    m = STEP_SPEC.match(spec)
    if spec in ("start", "final") or m:
        if run is None:
            raise ValueError(f"policy {spec!r} refers to a run, but no run directory was given")
        if spec == "start":
            adapter = Path(run.cfg.policy.adapter) if run.cfg.policy.adapter else None
            return _from_run(run, label or "start", spec, "start", adapter, 0)
        if spec == "final":
            final = run.run_dir / "final"
            if not (final / "adapter_config.json").is_file():
                raise FileNotFoundError(f"{final} holds no adapter: has the run finished? Use --checkpoint N for "
                                        "one of its checkpoints")
            return _from_run(run, label or "final", spec, "final", final, _final_step(run))
        step = int(m.group(1))
        folder = run.run_dir / "checkpoints" / f"step-{step:06d}"
        if not (folder / "adapter_config.json").is_file():
            have = sorted(p.name for p in (run.run_dir / "checkpoints").glob("step-*")) \
                if (run.run_dir / "checkpoints").is_dir() else []
            raise FileNotFoundError(f"no checkpoint {folder}; the run has: {have or 'none'}")
        return _from_run(run, label or f"step-{step}", spec, "checkpoint", folder, step)
    path = Path(spec)
    if path.is_dir() and (path / "config.yaml").is_file() and (path / "final").is_dir():
        other = RunContext.load(path)
        return _from_run(other, label or path.name, spec, "run", path / "final", _final_step(other))
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return _adapter_source(label or _folder_label(path), spec, path, None, run)
    if "+" in spec:
        base, adapter = spec.rsplit("+", 1)
        if Path(adapter).is_dir() and (Path(adapter) / "adapter_config.json").is_file():
            return _adapter_source(label or _folder_label(Path(adapter)), spec, Path(adapter), base, run)
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"policy {spec!r}: folder has neither config.json (a model), adapter_config.json "
                                "(an adapter) nor config.yaml + final/ (a run)")
    if not path.exists() and spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"policy {spec!r}: path not found")
    base_path = assets.resolve(spec, "policy")
    kind = detect_kind(base_path, "auto")
    return PolicySource(default_label or _folder_label(path), spec, "merged", spec, base_path, None, kind, base_path)


def _folder_label(path: Path) -> str:
    if path.name == "final" and path.parent.name:
        return path.parent.name
    return path.name or str(path)


def unique_labels(sources: list[PolicySource]) -> None:
    """Make labels unique and safe as column names (letters, digits, `-`, `_`, `.`)."""
    seen: dict[str, int] = {}
    for s in sources:
        label = re.sub(r"[^A-Za-z0-9_.-]+", "_", s.label).strip("_") or "policy"
        if label in seen:
            seen[label] += 1
            label = f"{label}-{seen[label]}"
        else:
            seen[label] = 1
        s.label = label


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------
@dataclass
class LoadedPolicy:
    """An inference-only language model. Has the `lm` and `kind` that `generate_rollouts` and `lm_forward` use."""
    lm: nn.Module
    kind: str
    tokenizer: Any
    source: PolicySource


def load_lm(src: PolicySource, dtype: torch.dtype, merge: bool = False,
            device: Optional[torch.device] = None) -> nn.Module:
    """Base model + adapter (kept as a PEFT model, i.e. exactly the trained function, unless `merge`). With a
    `device`, a base that the run trained quantized is loaded quantized there, as in training; without one (export)
    it is loaded in full precision."""
    quantization = src.quantization if device is not None else None
    if quantization:
        base = load_base_model(src.base_path, src.kind, dtype, src.revision, src.trust_remote_code, quantization,
                               device)
    else:
        base = load_base_model(src.base_path, src.kind, dtype, src.revision, src.trust_remote_code)
    if src.adapter is None:
        return base
    from peft import PeftModel

    lm = PeftModel.from_pretrained(base, src.adapter, is_trainable=False)
    return lm.merge_and_unload() if merge else lm


def load_policy(src: PolicySource, device: torch.device, dtype: torch.dtype) -> LoadedPolicy:
    lm = load_lm(src, dtype, device=device)
    if not src.quantization:  # bitsandbytes placed a quantized model already; its weights refuse .to()
        lm = lm.to(device)
    lm = lm.eval().requires_grad_(False)
    tokenizer = load_tokenizer(src.tokenizer_path, src.kind, None if src.tokenizer_path != src.base_path
                               else src.revision, src.trust_remote_code)
    return LoadedPolicy(lm, src.kind, tokenizer, src)
