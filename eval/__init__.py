"""detoxrl.eval."""
