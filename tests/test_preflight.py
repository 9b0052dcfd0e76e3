"""Bad input fails before any weights load, in one line that names the key, file (and line) or model and the fix,
with exit status 2 (the traceback only with --debug) in detoxrl-train, detoxrl-eval and detoxrl-export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from detoxrl.train import cli
from detoxrl.train.config import load_config
from detoxrl.train.errors import InputError
from detoxrl.train.loop import train

from test_train import FAST, RECIPES, recipe_overrides


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to load model weights fails the test: the preflight must have refused the input first."""
    import peft
    from transformers import PreTrainedModel
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    def refuse(*args, **kwargs):
        raise AssertionError(f"weights were loaded: from_pretrained{args[1:2]}")

    for cls in (PreTrainedModel, _BaseAutoModelClass, peft.PeftModel):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(refuse))


def bad_jsonl(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"sentence": "a fine line"}\n{"sentence": "another one"}\n{"sentence": "broken\n')
    return path


def cola(test_models, tmp_path, *extra: str):
    return load_config(RECIPES / "flan_t5_cola_neutral.yaml", [
        *recipe_overrides("flan_t5_cola_neutral", test_models), *FAST, f"run.output_dir={tmp_path / 'run'}", *extra])


CASES = {  # name: (overrides, what the one line must say)
    "unknown label": (["reward.terms.1.label=LABEL_7"],
                      r"^reward.terms.1.label: reward model '.*roberta_sentiment' has no label 'LABEL_7'; its labels "
                      r"are: 'LABEL_0', 'LABEL_1', 'LABEL_2'$"),
    "unknown toxic label": (["evaluation.before_after=true", "evaluation.split=test", "evaluation.toxic_label=toxic"],
                            r"^evaluation.toxic_label: reward model .* has no label 'toxic'"),
    "missing column": (["data.text_field=sentence"],
                       r"^data: column\(s\) \['sentence'\] not in dataset .* columns are: .*Check data.text_field"),
    "missing data file": (["data.dataset=/nonexistent/prompts.jsonl"],
                          r"^data.dataset: file not found: /nonexistent/prompts.jsonl; point data.dataset at"),
    "missing split": (["data.split=nosuch"], r"^data.split 'nosuch' not in .*; splits there: \['test', 'train'"),
    "no adapter": (["policy.adapter={tmp}"], r"^policy.adapter: .* is not a PEFT adapter folder"),
    "no model folder": (["policy.model=/nonexistent/t5"],
                        r"^policy.model: '/nonexistent/t5' is not a folder here and not a hub model name"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_in_the_preflight_before_any_weights_load(case, test_models, tmp_path, no_weights):
    overrides, message = CASES[case]
    cfg = cola(test_models, tmp_path, *[o.replace("{tmp}", str(tmp_path)) for o in overrides])
    with pytest.raises(InputError, match=message) as err:
        train(cfg)
    assert "\n" not in str(err.value)


def test_malformed_json_line_names_the_file_and_the_line(test_models, tmp_path, no_weights):
    path = bad_jsonl(tmp_path)
    with pytest.raises(InputError, match=rf"^data.dataset: {path}:3: not valid JSON \(Unterminated string starting "
                                         r"at, column 14\); fix or remove that line$"):
        train(cola(test_models, tmp_path, f"data.dataset={path}", "data.text_field=sentence",
                   "data.template='{sentence}'"))
    path.write_text('{"sentence": "a fine line"}\n["a", "list"]\n')
    with pytest.raises(InputError, match=rf"^data.dataset: {path}:2: a JSON list, but every line must be one object"):
        train(cola(test_models, tmp_path, f"data.dataset={path}", "data.text_field=sentence",
                   "data.template='{sentence}'"))


def test_prompt_and_response_over_a_causal_window_fail_before_the_model_loads(test_models, tmp_path, no_weights):
    cfg = load_config(RECIPES / "gpt2_imdb_positive.yaml", [
        *recipe_overrides("gpt2_imdb_positive", test_models), *FAST, f"run.output_dir={tmp_path}",
        "generation.max_new_tokens=1020", "generation.max_new_tokens_range=null", "data.prompt_tokens_range=null",
        "data.max_prompt_tokens=64"])
    with pytest.raises(InputError, match=r"^prompt \(\d+ tokens\) \+ response \(1020 tokens\) exceeds the model's "
                                         r"window of 1024; lower data.max_prompt_tokens"):
        train(cfg)


def test_cli_prints_one_line_and_exits_2_and_the_traceback_only_with_debug(test_models, tmp_path, capsys):
    path = bad_jsonl(tmp_path)
    argv = ["--config", str(RECIPES / "flan_t5_cola_neutral.yaml"), *recipe_overrides("flan_t5_cola_neutral",
            test_models), *FAST, f"run.output_dir={tmp_path / 'run'}", f"data.dataset={path}",
            "data.text_field=sentence", "data.template='{sentence}'"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    line = f"detoxrl-train: input error: data.dataset: {path}:3: not valid JSON"
    assert line in err and "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("detoxrl-train")] == [err.splitlines()[-1]]
    assert cli.main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.splitlines()[-1].startswith(line)


def test_hub_models_and_data_not_cached_while_offline_say_how_to_fetch_them(test_models, tmp_path):
    """HF_HUB_OFFLINE=1 and an empty cache stand for a machine without network: every command line says, in one
    line with exit status 2, which model (or dataset) is missing and how to fetch it."""
    recipe = str(RECIPES / "flan_t5_cola_neutral.yaml")
    local = [*recipe_overrides("flan_t5_cola_neutral", test_models), *FAST, f"run.output_dir={tmp_path / 'run'}"]
    calls = {
        "train-model": ["detoxrl.train.cli", ["--config", recipe, *local, "policy.model=google/flan-t5-base"]],
        "train-data": ["detoxrl.train.cli", ["--config", recipe, *local, "data.dataset=knkarthick/dialogsum"]],
        "eval": ["detoxrl.eval.cli", ["--config", recipe, *local, "--policy", "google/flan-t5-base", "--output",
                                      str(tmp_path / "eval")]],
        "export": ["detoxrl.eval.export", [f"google/flan-t5-base+{test_models['t5_sft_adapter']}", "--output",
                                           str(tmp_path / "merged")]],
    }
    code = textwrap.dedent(f"""
        import contextlib, importlib, io, json
        out = {{}}
        for name, (module, argv) in {calls!r}.items():
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                status = importlib.import_module(module).main(argv)
            out[name] = [status, err.getvalue()]
        print(json.dumps(out))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.splitlines()[-1])
    for name, (status, err) in results.items():
        last = err.strip().splitlines()[-1]
        assert status == 2 and "Traceback" not in err, (name, err)
        if name == "train-data":
            assert last.startswith("detoxrl-train: input error: data.dataset 'knkarthick/dialogsum' is not in the "
                                   "local datasets cache") and "save_to_disk" in last, last
            continue
        prog = {"train-model": "detoxrl-train", "eval": "detoxrl-eval", "export": "detoxrl-export"}[name]
        key = "policy.model: " if name == "train-model" else "model "
        assert last.startswith(f"{prog}: input error: {key}'google/flan-t5-base' is not in the local Hugging Face "
                               f"cache"), (name, last)
        assert "`hf download google/flan-t5-base`" in last and "`huggingface-cli download" in last, last
        assert "local folder" in last, last
