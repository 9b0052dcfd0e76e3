"""detoxrl.train."""
