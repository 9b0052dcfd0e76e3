"""Config: every recipe parses, overrides apply, unknown keys and impossible combinations fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from detoxrl.train.config import Config, ConfigError, load_config, markdown_reference, to_yaml

from conftest import REPO

RECIPES = sorted((REPO / "configs" / "ppo").glob("*.yaml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"demo.yaml", "flan_t5_base_dialogsum_detox.yaml", "flan_t5_cola_neutral.yaml", "gpt2_imdb_positive.yaml",
            "gpt2_imdb_negative.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(to_yaml(cfg))
    assert load_config(dumped) == cfg


def test_every_yaml_under_configs_is_valid_yaml():
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert files
    for f in files:
        yaml.safe_load(f.read_text())


def seeds_variant(recipe: Path) -> list[str]:
    """The overrides of a recipe's `# seeds-variant:` comment line (the seeds' exact hyperparameters)."""
    lines = [ln for ln in recipe.read_text().splitlines() if ln.startswith("# seeds-variant:")]
    assert len(lines) == 1, f"{recipe.name}: expected one '# seeds-variant:' line"
    return lines[0].split(":", 1)[1].split()


@pytest.mark.parametrize("name", ["flan_t5_base_dialogsum_detox", "flan_t5_cola_neutral", "gpt2_imdb_negative",
                                  "gpt2_imdb_positive"])
def test_every_recipe_learns_by_default_and_documents_the_seeds_variant(name):
    """Each shipped recipe carries the settings that move a LoRA policy (lr 3e-4, 2 epochs, KL target 3, detached
    critic) and a `# seeds-variant:` line whose overrides load and restore the seeds' lr 1.41e-5."""
    recipe = REPO / "configs/ppo" / f"{name}.yaml"
    cfg = load_config(recipe)
    assert (cfg.optim.lr, cfg.ppo.ppo_epochs, cfg.ppo.kl.target, cfg.critic.mode) == (3e-4, 2, 3.0, "detached")
    seeds = load_config(recipe, seeds_variant(recipe))
    assert seeds.optim.lr == 1.41e-5 and seeds.ppo.kl.target == 6.0 and seeds.critic.mode == "shared"


def test_seed_recipe_hyperparameters():
    cfg = load_config(REPO / "configs/ppo/flan_t5_base_dialogsum_detox.yaml")
    assert cfg.policy.model == "google/flan-t5-base"
    assert (cfg.policy.lora.r, cfg.policy.lora.alpha, cfg.policy.lora.dropout) == (32, 32, 0.05)
    assert cfg.reward.terms[0].model == "facebook/roberta-hate-speech-dynabench-r4-target"
    assert cfg.reward.terms[0].label == "nothate"
    assert (cfg.optim.lr, cfg.ppo.ppo_epochs, cfg.ppo.batch_size, cfg.ppo.mini_batch_size) == (3e-4, 2, 16, 4)
    assert (cfg.ppo.kl.target, cfg.critic.mode) == (3.0, "detached")
    seeds = load_config(REPO / "configs/ppo/flan_t5_base_dialogsum_detox.yaml",
                        seeds_variant(REPO / "configs/ppo/flan_t5_base_dialogsum_detox.yaml"))
    assert (seeds.optim.lr, seeds.ppo.ppo_epochs, seeds.ppo.kl.target, seeds.critic.mode) == (1.41e-5, 1, 6.0, "shared")
    assert cfg.generation.max_new_tokens_range == [100, 400] and cfg.generation.top_k == 0
    cola = load_config(REPO / "configs/ppo/flan_t5_cola_neutral.yaml")
    assert [(t.label, t.weight) for t in cola.reward.terms] == [("LABEL_1", 1.0), ("LABEL_1", 0.5)]
    imdb = load_config(REPO / "configs/ppo/gpt2_imdb_negative.yaml")
    assert imdb.policy.kind == "causal" and imdb.reward.terms[0].label == "NEGATIVE"
    assert imdb.data.prompt_tokens_range == [2, 8] and imdb.data.min_text_chars == 200


def test_overrides_take_precedence_and_parse_yaml_values():
    cfg = load_config(REPO / "configs/ppo/demo.yaml", ["ppo.kl.target=3", "reward.terms.0.weight=2.5",
                                                       "generation.max_new_tokens_range=[4, 9]", "policy.adapter=null"])
    assert cfg.ppo.kl.target == 3.0 and cfg.reward.terms[0].weight == 2.5
    assert cfg.generation.max_new_tokens_range == [4, 9] and cfg.policy.adapter is None


def test_override_can_replace_the_list_of_reward_terms():
    cfg = load_config(None, ["reward.terms=[{model: a, label: X}, {model: b, label: Y, weight: 0.5}]"])
    assert [(t.model, t.label, t.weight) for t in cfg.reward.terms] == [("a", "X", 1.0), ("b", "Y", 0.5)]


@pytest.mark.parametrize("override, fragment", [
    ("ppo.minibatch=3", "mini_batch_size"),                 # unknown key: closest valid key named
    ("reward.terms.0.outptu=logit", "output"),
    ("policyy.model=x", "policy"),
    ("policy.kind=encoder", "policy.kind"),                 # wrong enum value
    ("optim.lr=fast", "optim.lr"),                          # wrong type
    ("ppo.mini_batch_size=32", "ppo.mini_batch_size"),      # impossible: mini-batch > batch
    ("ppo.batch_size=10", "ppo.batch_size"),                # not divisible by mini-batch 4
    ("ppo.gradient_accumulation_steps=3", "ppo.gradient_accumulation_steps"),
    ("generation.max_new_tokens_range=[9,4]", "generation.max_new_tokens_range"),
    ("generation.top_p=0", "generation.top_p"),
    ("reward.terms=[]", "reward.terms"),
    ("evaluation.term=3", "evaluation.term"),
    ("run.total_steps=0", "run.total_steps"),
    ("notakeyvalue", "section.key=value"),
    ("ppo.k=3", "ppo.batch_size: (16) counts responses and must be divisible by ppo.k (3)"),
    ("ppo.k=1", "ppo.k: ppo.estimator=rloo compares the responses to one prompt: needs ppo.k >= 2"),
    ("ppo.kl.mode=loss", "ppo.kl.estimator: ppo.kl.mode=loss needs k2 or k3"),
    ("critic.warmup_steps=-1", "critic.warmup_steps"),
    ("critic.value_clip=off", "critic.value_clip"),          # YAML's false: the choices are named
])
def test_bad_config_fails_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs/ppo/demo.yaml", [override])
    assert fragment in str(err.value)


def test_unknown_key_in_yaml_file_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo:\n  batch_size: 8\n  mini_batch_sise: 4\n")
    with pytest.raises(ConfigError, match="mini_batch_size"):
        load_config(bad)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_print_config_round_trips(tmp_path, capsys):
    from detoxrl.train.cli import main

    assert main(["--config", str(REPO / "configs/ppo/gpt2_imdb_positive.yaml"), "--print-config",
                 "run.total_steps=7"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "p.yaml").write_text(printed)
    assert load_config(tmp_path / "p.yaml").run.total_steps == 7
    assert main(["--print-config", "ppo.nope=1"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "ppo.nope" in err


def test_docs_config_reference_is_up_to_date():
    doc = REPO / "docs" / "CONFIG.md"
    assert doc.read_text() == markdown_reference(), \
        "docs/CONFIG.md is stale: run `python -m detoxrl.train.config --markdown > docs/CONFIG.md`"


def test_every_field_is_documented():
    text = markdown_reference()
    rows = [ln for ln in text.splitlines() if ln.startswith("| `")]
    assert len(rows) > 60
    undocumented = [r for r in rows if r.rstrip().endswith("|  |")]
    assert not undocumented, undocumented


@pytest.mark.parametrize("overrides, fragment", [
    (["ppo.estimator=grpo", "ppo.k=4", "critic.mode=adapter"], "critic.mode: adapter builds a critic that"),
    (["ppo.estimator=rloo", "ppo.k=4", "critic.warmup_steps=2"], "critic.warmup_steps: ppo.estimator=rloo trains no"),
    (["ppo.estimator=gae", "critic.mode=adapter", "policy.gradient_checkpointing=true"],
     "policy.gradient_checkpointing: cannot be combined"),
])
def test_critic_options_that_cannot_work_together_fail(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(REPO / "configs/ppo/demo.yaml", overrides)


def test_moved_keys_say_what_replaced_them(tmp_path):
    with pytest.raises(ConfigError, match="policy.value_head_detach was replaced by critic.mode"):
        load_config(None, ["policy.value_head_detach=true"])
    old = tmp_path / "old.yaml"
    old.write_text("ppo:\n  value_clip_range: 0.2\n")
    with pytest.raises(ConfigError, match="ppo.value_clip_range was replaced by critic.value_clip_range"):
        load_config(old)
    cfg = load_config(None, ["critic.mode=adapter", "critic.lora={r: 4, alpha: 8, target_modules: [q]}",
                             "ppo.estimator=gae", "critic.value_clip=none", "ppo.k=4", "ppo.batch_size=16"])
    assert cfg.critic.lora.r == 4 and cfg.critic.lora.target_modules == ["q"] and cfg.critic.value_clip == "none"
