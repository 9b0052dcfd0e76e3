"""Throughput, memory and learning-per-step benchmarks of detoxrl against the seeds' loop and TRL 1.12's PPO.

Entry points: `python -m benchmarks.ppo_throughput` and `python -m benchmarks.reward_curves`; see the README, section Benchmarks.
Not part of the detoxrl distribution; run from the repository root.
"""
