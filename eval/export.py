"""`detoxrl-export`: merge a trained LoRA adapter into its base model and write a standalone transformers folder.

    detoxrl-export RUN_DIR                               # RUN_DIR/final merged -> RUN_DIR/merged
    detoxrl-export RUN_DIR --checkpoint 20 --output DIR  # a checkpoint instead
    detoxrl-export ADAPTER_DIR --output DIR              # any PEFT adapter (base from its run or adapter_config)
    detoxrl-export BASE+ADAPTER_DIR --output DIR --dtype bfloat16 --push-to-hub user/name

The folder holds the merged weights (safetensors), config, generation config, tokenizer, a model card README.md
(recipe, reward, evaluation figures when the run has them) and detoxrl_export.json (provenance). It loads offline
with AutoModelForSeq2SeqLM / AutoModelForCausalLM. Before writing, the merged model's logits on a probe input are
checked against base + adapter; the maximum difference is recorded.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from detoxrl.eval.policies import PolicySource, RunContext, load_lm, resolve_policy
from detoxrl.train.errors import loading_model, report
from detoxrl.train.models import lm_forward
from detoxrl.train.tracking import package_versions, setup_logging, write_json

log = logging.getLogger("detoxrl.export")

PROBE_TEXT = "Summarize the following conversation.\n\n#Person1#: Hello, how are you?\n#Person2#: Fine, thanks.\n\n" \
             "Summary:\n"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _probe(tokenizer, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = tokenizer(PROBE_TEXT, return_tensors="pt").input_ids[:, :64]
    response = ids[:, : min(8, ids.shape[1])]
    return ids, torch.ones_like(ids), response


def _probe_logits(lm, kind: str, probe) -> torch.Tensor:
    with torch.inference_mode():
        logits, _ = lm_forward(lm, kind, probe[0], probe[1], probe[2], False)
    return logits.float()


def _auto_class(kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM


def export(src: PolicySource, output: Path, dtype: str = "float32", run: Optional[RunContext] = None,
           verify: bool = True) -> dict[str, Any]:
    """Merge `src` (base + adapter) and write the standalone folder. Returns the provenance record."""
    from transformers import AutoTokenizer

    if src.adapter is None:
        raise ValueError(f"{src.spec!r} is a plain model with no adapter: nothing to merge")
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty")
    t0 = time.perf_counter()
    with loading_model(src.tokenizer_path):
        tokenizer = AutoTokenizer.from_pretrained(src.tokenizer_path, trust_remote_code=src.trust_remote_code)
    # Merge in float32 (LoRA deltas are small; merging in half precision loses them), then cast.
    lm = load_lm(src, torch.float32, merge=False).eval()
    probe = _probe(tokenizer, src.kind)
    want = _probe_logits(lm, src.kind, probe) if verify else None
    merged = lm.merge_and_unload().to(DTYPES[dtype]).eval()
    output.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(output))
    tokenizer.save_pretrained(str(output))
    del lm, merged
    record: dict[str, Any] = {
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": src.identity(), "dtype": dtype,
        "kind": src.kind, "packages": package_versions()}
    if verify:
        reloaded = _auto_class(src.kind).from_pretrained(str(output), dtype=torch.float32).eval()
        got = _probe_logits(reloaded, src.kind, probe)
        diff = float((got - want).abs().max())
        tol = 1e-3 * max(1.0, float(want.abs().max())) if dtype == "float32" else None
        record["verification"] = {"max_abs_logit_diff": diff, "tolerance": tol, "probe": PROBE_TEXT}
        if tol is not None and diff > tol:
            raise RuntimeError(f"merged model differs from base + adapter: max |logit diff| {diff:.3g} > {tol:.3g}")
        log.info("verified: merged logits match base + adapter (max |diff| %.2e)", diff)
    write_json(output / "detoxrl_export.json", record)
    (output / "README.md").write_text(model_card(src, run, record, output), encoding="utf-8")
    log.info("exported %s to %s in %.1fs", src.spec, output, time.perf_counter() - t0)
    return record


# --------------------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------------------
def _is_hub_name(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def _eval_section(src: PolicySource, run: Optional[RunContext]) -> list[str]:
    """Figures from the run's detoxrl-eval report (when it evaluated this very adapter), else the trainer's
    before/after numbers for the final adapter."""
    if run is None:
        return []
    sha = src.identity().get("adapter_sha256")
    metrics_path = run.run_dir / "eval" / "metrics.json"
    if metrics_path.is_file():
        doc = json.loads(metrics_path.read_text())
        if any(p["identity"].get("adapter_sha256") == sha for p in doc.get("policies", [])):
            from detoxrl.eval.report import markdown_table, metric_table, settings_summary

            header, rows = metric_table(doc)
            return ["## Evaluation", "", f"From `detoxrl-eval` ({metrics_path.relative_to(run.run_dir)}): "
                    + settings_summary(doc), "", markdown_table(header, rows), ""]
    ba = run.run_dir / "eval_before_after.json"
    if ba.is_file() and src.source in ("final", "run"):
        e = json.loads(ba.read_text())
        b, a = e.get("before", {}), e.get("after", {})
        if b and a:
            return ["## Evaluation", "", f"Held-out toxicity measured by the trainer on {b.get('num_samples')} prompts "
                    f"(split `{run.cfg.evaluation.split}`, P(`{run.cfg.evaluation.toxic_label}`)):", "",
                    "| | before | after |", "|---|---|---|",
                    f"| toxicity mean | {b['toxicity_mean']:.4f} | {a['toxicity_mean']:.4f} |",
                    f"| toxicity std | {b['toxicity_std']:.4f} | {a['toxicity_std']:.4f} |",
                    f"| reward mean | {b['reward_mean']:.4f} | {a['reward_mean']:.4f} |", ""]
    return []


def model_card(src: PolicySource, run: Optional[RunContext], record: dict[str, Any], output: Path) -> str:
    seq2seq = src.kind == "seq2seq"
    front: dict[str, Any] = {"library_name": "transformers",
                             "pipeline_tag": "text2text-generation" if seq2seq else "text-generation",
                             "tags": ["detoxrl", "ppo", "rlhf", "lora", "merged"]}
    if _is_hub_name(src.base):
        front["base_model"] = src.base
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {output.name}", "",
             f"`{src.base}` with a LoRA adapter trained by PPO (detoxrl) merged into its weights: a standalone "
             f"{'seq2seq' if seq2seq else 'causal'} transformers model (no PEFT needed).", "",
             "## Source", "",
             f"- base model: `{src.base}`" + (f" ({src.base_path})" if src.base_path != src.base else ""),
             f"- adapter: `{src.adapter}` (sha256 {record['source'].get('adapter_sha256')})",
             f"- PPO step: {src.step if src.step is not None else 'unknown'}",
             f"- weights dtype: {record['dtype']}"]
    if "verification" in record:
        lines.append(f"- check: logits of the merged model vs base + adapter on a probe input, max |diff| = "
                     f"{record['verification']['max_abs_logit_diff']:.2e}")
    lines.append("")
    if run is not None:
        cfg = run.cfg
        p, g, o, k = cfg.policy, cfg.generation, cfg.optim, cfg.ppo.kl
        lines += ["## Training recipe", "",
                  f"- policy: `{p.model}`" + (f" + starting adapter `{p.adapter}` (trained further)" if p.adapter
                                              else f" + fresh LoRA r={p.lora.r}, alpha={p.lora.alpha}, "
                                                   f"targets {p.lora.target_modules}"),
                  f"- data: `{cfg.data.dataset}` split `{cfg.data.split}`, field `{cfg.data.text_field}`, "
                  f"template `{cfg.data.template!r}`",
                  f"- PPO: {cfg.run.total_steps} steps of {cfg.ppo.batch_size} prompts per process, "
                  f"{cfg.ppo.ppo_epochs} epoch(s), mini-batch {cfg.ppo.mini_batch_size}, lr {o.lr}, "
                  f"KL coefficient {k.init_coef} ({'adaptive, target ' + str(k.target) if k.adaptive else 'fixed'})",
                  f"- sampling: top_k={g.top_k} top_p={g.top_p} temperature={g.temperature}, "
                  + (f"{g.max_new_tokens_range[0]}-{g.max_new_tokens_range[1]}" if g.max_new_tokens_range
                     else str(g.max_new_tokens)) + " new tokens", "",
                  "## Reward", "", "| model | label | output | weight | scored text |", "|---|---|---|---|---|"]
        for t in cfg.reward.terms:
            lines.append(f"| `{t.model}` | {t.label} | {t.output} | {t.weight} | "
                         f"{'prompt + response (prompt cut from the left)' if t.score == 'prompt_response' else 'response'} |")
        lines.append("")
        lines += _eval_section(src, run)
    auto = "AutoModelForSeq2SeqLM" if seq2seq else "AutoModelForCausalLM"
    template = run.cfg.data.template if run is not None else "{text}"
    lines += ["## Usage", "", "```python", f"from transformers import AutoTokenizer, {auto}", "",
              f'tokenizer = AutoTokenizer.from_pretrained("{output.name}")',
              f'model = {auto}.from_pretrained("{output.name}")',
              f"prompt = {template!r}  # the training prompt template; fill in the fields",
              'inputs = tokenizer(prompt, return_tensors="pt")',
              "out = model.generate(**inputs, max_new_tokens=100, do_sample=True, top_k=0, top_p=1.0)",
              "print(tokenizer.decode(out[0]" + ("" if seq2seq else ", inputs.input_ids.shape[1]:") +
              ", skip_special_tokens=True))", "```", ""]
    if seq2seq:
        lines += ["With transformers 4.x, `pipeline(\"text2text-generation\", model=...)` loads it too (transformers 5 "
                  "removed that pipeline task).", ""]
    else:
        lines += ["`pipeline(\"text-generation\", model=...)` loads it too.", ""]
    if run is not None:
        lines += ["## Full recipe", "", "<details><summary>config.yaml</summary>", "", "```yaml",
                  (run.run_dir / "config.yaml").read_text().rstrip(), "```", "", "</details>", ""]
    lines += [f"Exported with detoxrl {record['packages'].get('detoxrl')} on {record['exported']}.", ""]
    return "\n".join(lines)


def push_to_hub(folder: Path, repo: str, private: bool) -> str:
    """Upload the folder to the Hugging Face Hub (needs network and a token: `huggingface-cli login`)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo, folder_path=str(folder), commit_message="Upload merged detoxrl policy")
    return str(getattr(info, "commit_url", repo))


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="detoxrl-export", description="Merge a trained LoRA adapter into its base model "
                                "and write a standalone transformers folder with tokenizer and model card.")
    p.add_argument("source", help="RUN_DIR (its final/), a checkpoint or adapter folder, or BASE+ADAPTER_DIR")
    p.add_argument("--checkpoint", metavar="N", help="with a RUN_DIR: export checkpoint step N instead of final/")
    p.add_argument("--output", "-o", type=Path, help="output folder (default RUN_DIR/merged for a run)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the saved weights")
    p.add_argument("--no-verify", action="store_true", help="skip the logits check against base + adapter")
    p.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this Hub repository")
    p.add_argument("--private", action="store_true", help="create the Hub repository as private")
    p.add_argument("--debug", action="store_true", help="print the traceback of an input error too")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging(True)
    try:
        path = Path(args.source)
        run = None
        if path.is_dir() and (path / "config.yaml").is_file():
            run = RunContext.load(path)
            src = resolve_policy(f"step-{args.checkpoint}" if args.checkpoint else "final", run)
        else:
            if args.checkpoint:
                raise ValueError("--checkpoint needs a RUN_DIR as the source")
            src = resolve_policy(args.source)
            if src.run_dir:
                run = RunContext.load(src.run_dir)
        output = args.output or (run.run_dir / ("merged" if not args.checkpoint else f"merged-step-{args.checkpoint}")
                                 if run else None)
        if output is None:
            raise ValueError("--output is required when the source is not a run directory")
        export(src, output, args.dtype, run, verify=not args.no_verify)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as err:  # InputError is a ValueError
        return report("detoxrl-export", err, args.debug)
    print(f"merged model written to {output}")
    if args.push_to_hub:
        print(f"pushed: {push_to_hub(output, args.push_to_hub, args.private)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
