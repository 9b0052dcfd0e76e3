"""Checkpoint size and save/load time for a policy config: detoxrl's own save_checkpoint / load_checkpoint.

    python -m benchmarks.checkpoint_cost base     # flan-t5-base's architecture, random weights, LoRA r=32 on q,v
    python -m benchmarks.checkpoint_cost tiny     # the tiny test T5 (built locally), LoRA r=16 on q,v

The figures in the README ("Checkpoint cost") came from these two commands."""
import os, shutil, sys, tempfile, time
from pathlib import Path
import torch
from accelerate import Accelerator
from transformers import T5Config, T5ForConditionalGeneration, get_scheduler
from detoxrl.train import checkpoint as ckpt
from detoxrl.train.config import LoraConfig, PolicyConfig
from detoxrl.train.models import build_policy

torch.set_num_threads(1)
which = sys.argv[1]
work = Path(tempfile.mkdtemp(prefix="ckptcost-"))
if which == "base":   # flan-t5-base's architecture, random weights
    model_dir = work / "t5-base-random"
    T5ForConditionalGeneration(T5Config(d_model=768, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12,
                                        d_kv=64, vocab_size=32128, feed_forward_proj="gated-gelu",
                                        tie_word_embeddings=False)).save_pretrained(model_dir)
    lora = LoraConfig(r=32, alpha=32, dropout=0.05, target_modules=["q", "v"])
else:
    from detoxrl.train.stand_in_models import build_test_models
    model_dir = Path(os.environ.get("TINY_T5") or build_test_models(work / "tiny")["t5"])
    lora = LoraConfig(r=16, alpha=32, dropout=0.05, target_modules=["q", "v"])
acc = Accelerator(cpu=True)

def fresh():
    policy = build_policy(PolicyConfig(model=str(model_dir), lora=lora), str(model_dir), "seq2seq",
                          torch.device("cpu"), torch.float32, True, 0)
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=100)
    return policy, params, opt, sched

policy, params, opt, sched = fresh()
for p in params:   # one optimizer step so AdamW holds its moments, as in a real checkpoint
    p.grad = torch.randn_like(p) * 1e-3
opt.step(); sched.step()
n_train = sum(p.numel() for p in params)
state = ckpt.TrainerState(step=1, samples_seen=16, world_size=1)
saves, loads = [], []
for i in range(7):
    t0 = time.perf_counter()
    folder = ckpt.save_checkpoint(acc, policy, opt, sched, state, work / "checkpoints", i + 1, keep_last=1)
    saves.append(time.perf_counter() - t0)
    p2, _, o2, s2 = fresh()
    t0 = time.perf_counter()
    ckpt.load_checkpoint(folder, acc, p2, o2, s2)
    loads.append(time.perf_counter() - t0)
assert all(torch.equal(a, b) for a, b in zip(params, [p for p in p2.parameters() if p.requires_grad]))
files = {str(f.relative_to(folder)): f.stat().st_size for f in folder.rglob("*") if f.is_file()}
print(f"{which}: {n_train:,} trainable parameters; checkpoint {sum(files.values()) / 1e6:.2f} MB "
      f"(adapter {files['adapter_model.safetensors'] / 1e6:.2f} MB, optimizer {files['optimizer.pt'] / 1e6:.2f} MB); "
      f"save {sorted(saves)[3]:.3f} s, load {sorted(loads)[3]:.3f} s (median of 7; load = weights + optimizer + "
      f"scheduler + RNG into an already built model)")
shutil.rmtree(work)
