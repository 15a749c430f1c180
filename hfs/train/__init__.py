"""The training loop, distributed launch, checkpoints."""
