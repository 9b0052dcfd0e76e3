"""detoxrl.launch."""
