"""detoxrl.launch: `detoxrl-launch` builds (and runs) `accelerate launch` command lines with a checked device plan;
`devices` holds the placement rule the trainer shares with it."""
