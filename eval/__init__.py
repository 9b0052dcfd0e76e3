"""detoxrl.eval: compare policies (toxicity, reward terms, ROUGE, length, distinct-n, KL), write reports and plots
(`detoxrl-eval`), and merge a trained adapter into a standalone model (`detoxrl-export`)."""
