"""The rollout engines (generation.engine, train/rollout.py): the static-KV-cache sampler samples what the HF path
samples. On the CPU, eager float32: the same logits at every step (within float tolerance) and, from the same seed,
the same responses, on tiny T5 and GPT-2, with and without LoRA, rows of different lengths, k responses per prompt,
top-k / top-p / temperature / min_new_tokens and rows that stop at EOS at different steps. Compiled decode steps
are checked on a GPU (`gpu`): there compiled kernels round differently, so responses can diverge after a near-tie
and the check is on the logits of the same tokens."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

from detoxrl.train.config import GenerationConfig
from detoxrl.train.models import load_tokenizer, lm_forward
from detoxrl.train.rollout import (generate_rollouts, hf_generation_config, pad_for_engine, pad_prompts,
                                   plan_engine)

from test_models import critic_policy, perturb_lora

CPU = torch.device("cpu")
TEXTS = ["hello there friend how are you today", "a b", "the quick brown fox jumps over the lazy dog again and",
         "no"]
SETTINGS = dict(max_new_tokens=10, min_new_tokens=2, top_k=40, top_p=0.9, temperature=0.8)


def _policy(test_models, family: str, lora: bool):
    """A LoRA policy (adapter perturbed, so it changes the function), or the bare model (no PEFT wrapper)."""
    kind = "seq2seq" if family == "t5" else "causal"
    if lora:
        policy = critic_policy(test_models, "shared", family)
        perturb_lora(policy, 0.3)
    else:
        cls = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
        policy = SimpleNamespace(lm=cls.from_pretrained(str(test_models[family])).eval(), kind=kind)
    tok = load_tokenizer(str(test_models[family]), kind)
    base = policy.lm.get_base_model() if hasattr(policy.lm, "get_base_model") else policy.lm
    with torch.no_grad():  # EOS likelier, so that rows stop at different steps
        base.get_output_embeddings().weight[tok.eos_token_id].mul_(4.0)
    return policy, tok


def _generate(policy, tok, engine: str, seed: int, k: int = 2):
    gen = GenerationConfig(engine=engine, compile="never", static_pad_multiple=16, **SETTINGS)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    torch.manual_seed(seed)
    return generate_rollouts(policy, prompts, tok, gen, SETTINGS["max_new_tokens"], CPU, k=k)


@pytest.mark.parametrize("family", ["t5", "gpt2"])
@pytest.mark.parametrize("lora", [True, False])
def test_static_engine_samples_what_hf_samples(test_models, family, lora):
    policy, tok = _policy(test_models, family, lora)
    ended_some = False
    for seed in range(3):
        hf, static = _generate(policy, tok, "hf", seed), _generate(policy, tok, "static", seed)
        assert torch.equal(static.response_ids, hf.response_ids), seed
        assert torch.equal(static.response_mask, hf.response_mask) and torch.equal(static.ended, hf.ended)
        # the rollout keeps the prompts as the trainer padded them (not the engine's extra padding)
        assert torch.equal(static.prompt_ids, hf.prompt_ids) and torch.equal(static.prompt_mask, hf.prompt_mask)
        lengths = hf.response_mask.sum(1)
        assert (lengths >= SETTINGS["min_new_tokens"]).all()
        ended_some |= bool(hf.ended.any() and not hf.ended.all())
    assert ended_some   # rows stopped at EOS at different steps while others went on


@pytest.mark.parametrize("engine", ["hf", "static"])
@pytest.mark.parametrize("mode", ["detached", "adapter"])
def test_old_logprobs_reuse_the_rollouts_encoder_states(test_models, engine, mode):
    """seq2seq: the encoder runs once per prompt, for sampling; the old log-prob pass reuses its states (rows of
    k = 2 responses per prompt, prompts of different lengths, the engine's extra padding cut off) and gives what
    encoding again gives, chunked or length-bucketed; the adapter critic's values encode afresh, as they must."""
    from detoxrl.train.experience import forward_in_chunks

    policy = critic_policy(test_models, mode)
    perturb_lora(policy, 0.3)
    tok = load_tokenizer(str(test_models["t5"]), "seq2seq")
    rollout = _generate(policy, tok, engine, seed=0)
    enc = rollout.encoder_states
    assert enc is not None and enc.shape[:2] == rollout.prompt_ids.shape
    assert torch.equal(enc[0], enc[1]) and not torch.equal(enc[0], enc[2])  # rows 0, 1 answer prompt 0
    for chunk, bucket in ((8, False), (2, True)):
        reused = forward_in_chunks(policy, rollout, chunk, 0.8, group=2, bucket=bucket)
        again = forward_in_chunks(policy, rollout, chunk, 0.8, group=2, bucket=bucket, reuse_encoder=False)
        for a, b in zip(reused, again):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    causal, _ = _policy(test_models, "gpt2", True)
    assert _generate(causal, load_tokenizer(str(test_models["gpt2"]), "causal"), engine, 0).encoder_states is None


@pytest.mark.parametrize("engine", ["hf", "static"])
@pytest.mark.parametrize("family,mode", [("t5", "shared"), ("gpt2", "detached"), ("t5", "adapter")])
def test_rollout_logprobs_equal_the_old_logprob_pass(test_models, engine, family, mode):
    """ppo.rollout_logprobs: the log-probs and values kept from sampling equal what the old log-prob pass computes
    (float tolerance: incremental decoding against the teacher-forced pass), on two generation chunks whose rows
    stopped at EOS at different steps, k = 2 responses per prompt; the adapter critic's values take its own pass."""
    from detoxrl.train.experience import forward_in_chunks, old_logprobs_and_values

    policy = critic_policy(test_models, mode, family)
    perturb_lora(policy, 0.3)
    torch.nn.init.normal_(policy.v_head.weight, std=0.1)
    tok = load_tokenizer(str(test_models[family]), policy.kind)
    base = policy.lm.get_base_model()
    with torch.no_grad():  # EOS likelier, so that rows stop at different steps
        base.get_output_embeddings().weight[tok.eos_token_id].mul_(4.0)
    gen = GenerationConfig(engine=engine, compile="never", static_pad_multiple=16, rollout_batch_size=2, **SETTINGS)
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    rollouts = []
    for keep in (False, True):
        torch.manual_seed(0)
        rollouts.append(generate_rollouts(policy, prompts, tok, gen, SETTINGS["max_new_tokens"], CPU, k=2,
                                          keep_logprobs=keep, keep_hidden=keep and mode != "adapter"))
    plain, kept = rollouts
    assert plain.logprobs is None and kept.logprobs.shape == kept.response_ids.shape
    assert torch.equal(plain.response_ids, kept.response_ids)  # keeping them does not change what is sampled
    lengths = kept.response_mask.sum(1)
    assert lengths.min() < lengths.max()
    live = kept.response_mask.bool()
    recomputed = forward_in_chunks(policy, plain, 8, SETTINGS["temperature"], group=2)
    from_sampling = old_logprobs_and_values(policy, kept, 8, SETTINGS["temperature"], group=2)
    for a, b in zip(from_sampling, recomputed):
        torch.testing.assert_close(a[live], b[live], rtol=1e-5, atol=1e-5)
    assert from_sampling[1][live].abs().min() > 0  # the value head does contribute


@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_static_engine_logits_match_hf_at_every_step(test_models, family):
    """generate()'s own per-step logits: static == hf, and both == the trainer's teacher-forced forward pass."""
    policy, tok = _policy(test_models, family, lora=True)
    left = policy.kind == "causal"
    ids, mask = pad_prompts([tok(t)["input_ids"] for t in TEXTS], tok.pad_token_id, left, CPU)
    gen = GenerationConfig(engine="static", compile="never", static_pad_multiple=16, **SETTINGS)
    outs = {}
    for engine in ("hf", "static"):
        g = GenerationConfig(**{**gen.__dict__, "engine": engine})
        plan = plan_engine(policy.lm, g, CPU, False)
        assert plan.engine == engine
        hf_gen = hf_generation_config(policy.lm, tok, g, 10, 1, plan, left, 16)
        gi, gm = pad_for_engine(ids, mask, tok.pad_token_id, left, plan, 16)
        torch.manual_seed(0)
        with torch.no_grad():
            outs[engine] = policy.lm.generate(input_ids=gi, attention_mask=gm, generation_config=hf_gen,
                                              output_logits=True, return_dict_in_generate=True)
    hf, static = outs["hf"], outs["static"]
    assert torch.equal(hf.sequences[:, -10:], static.sequences[:, -10:])
    hf_logits, static_logits = torch.stack(hf.logits, 1), torch.stack(static.logits, 1)
    resp = hf.sequences[:, 1:] if not left else hf.sequences[:, ids.shape[1]:]
    live = torch.cumsum((resp == tok.eos_token_id).long(), 1) - (resp == tok.eos_token_id).long() == 0
    torch.testing.assert_close(static_logits[live], hf_logits[live], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        forced, _ = lm_forward(policy.lm, policy.kind, ids, mask, resp, want_hidden=False)
    torch.testing.assert_close(forced[live], static_logits[live], rtol=1e-4, atol=1e-4)


def test_fallbacks_name_their_reason(test_models, caplog):
    policy, tok = _policy(test_models, "t5", lora=True)
    gen = GenerationConfig(engine="static")
    with caplog.at_level(logging.WARNING, logger="detoxrl.models"):
        plan = plan_engine(policy.lm, gen, CPU, synced_gpus=True)
    assert plan.engine == "hf" and "synced_gpus" in plan.fallback
    assert any("falling back to hf" in r.message and "ZeRO-3" in r.message for r in caplog.records)
    base = policy.lm.get_base_model()
    base._can_compile_fullgraph = False   # as a model class without static-cache support declares it
    plan = plan_engine(policy.lm, gen, CPU, synced_gpus=False)
    assert plan.engine == "hf" and "T5ForConditionalGeneration" in plan.fallback
    del base._can_compile_fullgraph
    assert plan_engine(policy.lm, gen, CPU, False) == plan_engine(policy.lm, gen, CPU, False)
    auto = plan_engine(policy.lm, gen, CPU, False)
    assert auto.engine == "static" and not auto.compile          # compile: auto = CUDA only
    assert plan_engine(policy.lm, GenerationConfig(), CPU, False).engine == "hf"   # the default engine


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["t5", "gpt2"])
def test_compiled_static_engine_on_gpu(test_models, family):
    """The compiled decode step (CUDA graphs) on a GPU: every sampled response is scored by the teacher-forced
    forward pass with the logits the sampler used, within float32 tolerance; a second call reuses the
    compiled step (same shapes) and gives the same responses from the same seed."""
    policy, tok = _policy(test_models, family, lora=True)
    cuda = torch.device("cuda")
    policy.lm.to(cuda)
    left = policy.kind == "causal"
    ids, mask = pad_prompts([tok(t)["input_ids"] for t in TEXTS], tok.pad_token_id, left, cuda)
    gen = GenerationConfig(engine="static", compile="always", static_pad_multiple=16, **SETTINGS)
    plan = plan_engine(policy.lm, gen, cuda, False)
    assert plan.compile and plan.compile_mode == "reduce-overhead"
    hf_gen = hf_generation_config(policy.lm, tok, gen, 10, 1, plan, left, 16)
    gi, gm = pad_for_engine(ids, mask, tok.pad_token_id, left, plan, 16)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        with torch.no_grad():
            runs.append(policy.lm.generate(input_ids=gi, attention_mask=gm, generation_config=hf_gen,
                                           output_logits=True, return_dict_in_generate=True))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    out = runs[0]
    resp = out.sequences[:, 1:] if not left else out.sequences[:, gi.shape[1]:]
    live = torch.cumsum((resp == tok.eos_token_id).long(), 1) - (resp == tok.eos_token_id).long() == 0
    with torch.no_grad():
        forced, _ = lm_forward(policy.lm, policy.kind, ids, mask, resp, want_hidden=False)
    torch.testing.assert_close(forced[live], torch.stack(out.logits, 1)[live], rtol=1e-3, atol=1e-3)


def test_a_run_with_the_static_engine_equals_the_hf_run(demo_assets, tmp_path):
    """End to end (the demo toy with a critic, 2 steps, k=2 responses per prompt): the same rewards, losses and final adapter as
    the default engine, bitwise (eager on the CPU both sample the same tokens from the same seed); with
    ppo.rollout_logprobs the same within float tolerance."""
    from safetensors.torch import load_file

    from detoxrl.train.config import load_config
    from detoxrl.train.loop import train

    from test_train import RECIPES

    runs = {}
    for name, engine, kept in (("hf", "hf", False), ("static", "static", False), ("kept", "static", True)):
        cfg = load_config(RECIPES / "demo.yaml", [
            f"run.output_dir={tmp_path / name}", f"policy.model={demo_assets['policy']}",
            f"reward.terms.0.model={demo_assets['reward']}", f"data.dataset={demo_assets['data']}",
            "run.total_steps=2", "ppo.k=2", f"generation.engine={engine}", "logging.progress_bar=false",
            f"ppo.rollout_logprobs={str(kept).lower()}", "ppo.estimator=gae",  # a critic: values kept too
            "logging.tensorboard=false", "evaluation.before_after=false", "checkpoint.every_steps=0", "judges=[]"])
        runs[name] = train(cfg).metrics
    for key in ("env/reward_mean", "ppo/loss/total", "env/response_length_mean"):
        assert [m[key] for m in runs["static"]] == [m[key] for m in runs["hf"]], key
    adapters = {name: load_file(str(tmp_path / name / "final" / "adapter_model.safetensors")) for name in runs}
    assert all(torch.equal(adapters["hf"][k], adapters["static"][k]) for k in adapters["hf"])
    # ppo.rollout_logprobs: the same samples, the old log-probs and values from the sampling pass (equal up to
    # float rounding), so the same losses within float tolerance and an adapter within 1e-5 (Adam divides
    # the rounding differences of the gradients by their scale: each step moves a weight by up to lr = 3e-4)
    assert runs["kept"][0]["env/reward_mean"] == runs["static"][0]["env/reward_mean"]
    assert runs["kept"][0]["time/old_logprobs"] < runs["static"][0]["time/old_logprobs"]
    for key in ("ppo/loss/total", "ppo/loss/value", "objective/kl"):
        assert [m[key] for m in runs["kept"]] == pytest.approx([m[key] for m in runs["static"]], abs=1e-5)
    for k in adapters["hf"]:
        torch.testing.assert_close(adapters["kept"][k], adapters["static"][k], rtol=1e-4, atol=1e-5)
