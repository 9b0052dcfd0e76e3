"""detoxrl-export: the merged model is a standalone transformers folder whose logits match base + adapter, for the
seq2seq and the causal path; it loads offline; the model card states recipe, reward and eval figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from detoxrl.eval import cli
from detoxrl.eval.export import main as export_main
from detoxrl.train.config import load_config
from detoxrl.train.loop import train

from conftest import REPO
from test_train import FAST, recipe_overrides

RECIPES = REPO / "configs" / "ppo"
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def tiny_run(test_models, tmp_path_factory) -> Path:
    """2 PPO steps of the headline recipe on the tiny test models (starts from an SFT adapter; checkpoints 1, 2)."""
    out = tmp_path_factory.mktemp("tiny_run")
    train(load_config(RECIPES / "flan_t5_base_dialogsum_detox.yaml",
                      [*recipe_overrides("flan_t5_base_dialogsum_detox", test_models), *FAST, "optim.lr=0.01",
                       "evaluation.before_after=false", f"run.output_dir={out}"]))
    return out


def _offline_generate(folder: Path, auto_class: str, task: str) -> dict:
    """Load the folder in a fresh process with the hub switched off; generate with the model and the pipeline."""
    code = f"""
import json, sys, transformers
from transformers import AutoTokenizer, {auto_class}
tok = AutoTokenizer.from_pretrained({str(folder)!r})
model = {auto_class}.from_pretrained({str(folder)!r})
ids = tok("Summarize the following conversation. hello there", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=4, do_sample=False)
result = {{"generate": tok.decode(out[0], skip_special_tokens=True), "pipeline": None}}
try:
    pipe = transformers.pipeline({task!r}, model={str(folder)!r})
    result["pipeline"] = str(pipe("hello there", max_new_tokens=4))
except KeyError as err:  # transformers 5 removed text2text-generation
    result["pipeline_removed"] = str(err)
print(json.dumps(result))
"""
    proc = subprocess.run([sys.executable, "-c", code], env=OFFLINE, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_exported_seq2seq_model_matches_base_plus_adapter(tiny_run, test_models, tmp_path):
    # evaluate first, so the model card can quote the figures of this very adapter
    assert cli.main([str(tiny_run), "--num-samples", "6", "--max-new-tokens", "4", "--bootstrap", "50",
                     "--no-progress"]) == 0
    out = tmp_path / "merged"
    assert export_main([str(tiny_run), "--output", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer_config.json").is_file() and not (out / "adapter_config.json").exists()

    merged = AutoModelForSeq2SeqLM.from_pretrained(str(out)).eval()
    reference = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(str(test_models["t5"])),
                                          str(tiny_run / "final")).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 1], [11, 12, 13, 1, 0, 0, 0]])
    mask = (torch.arange(7) < torch.tensor([[7], [4]])).long()
    dec = torch.tensor([[0, 9, 10, 11], [0, 4, 5, 6]])
    with torch.no_grad():
        got = merged(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        want = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        sft = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(str(test_models["t5"])),
                                        str(test_models["t5_sft_adapter"])).eval()(
            input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, sft, atol=1e-4)          # the trained adapter, not the starting one

    record = json.loads((out / "detoxrl_export.json").read_text())
    assert record["verification"]["max_abs_logit_diff"] < 1e-4 and record["source"]["step"] == 2
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text2text-generation")
    for text in ("## Training recipe", "## Reward", "| nothate | logit | 1.0 | response |", "## Evaluation",
                 "toxicity mean P(hate)", "ROUGE-L", "AutoModelForSeq2SeqLM", "config.yaml"):
        assert text in card, text

    loaded = _offline_generate(out, "AutoModelForSeq2SeqLM", "text2text-generation")
    assert isinstance(loaded["generate"], str)
    assert loaded["pipeline"] is not None or "removed" in loaded["pipeline_removed"]


def test_exported_causal_model_matches_base_plus_adapter(test_models, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(str(test_models["gpt2"]))
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type=TaskType.CAUSAL_LM))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(lora.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    adapter = tmp_path / "adapter"
    lora.save_pretrained(str(adapter))
    out = tmp_path / "merged"
    assert export_main([f"{test_models['gpt2']}+{adapter}", "--output", str(out)]) == 0

    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(test_models["gpt2"])),
                                          str(adapter)).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(test_models["gpt2"])).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        got, want, before = merged(ids).logits, reference(ids).logits, plain(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, before, atol=1e-3)
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "AutoModelForCausalLM" in card
    loaded = _offline_generate(out, "AutoModelForCausalLM", "text-generation")
    assert loaded["pipeline"] is not None                   # text-generation exists in every transformers version


def test_export_checkpoint_and_errors(tiny_run, test_models, tmp_path):
    assert export_main([str(tiny_run), "--checkpoint", "1", "--no-verify"]) == 0
    assert (tiny_run / "merged-step-1" / "model.safetensors").is_file()
    assert json.loads((tiny_run / "merged-step-1" / "detoxrl_export.json").read_text())["source"]["step"] == 1
    assert export_main([str(tiny_run), "--checkpoint", "1"]) == 2          # the output exists: refused
    assert export_main([str(test_models["t5"]), "--output", str(tmp_path / "x")]) == 2   # no adapter to merge
    assert export_main([str(tiny_run / "final")]) == 0                    # an adapter folder inside a run
    assert (tiny_run / "merged" / "model.safetensors").is_file()
