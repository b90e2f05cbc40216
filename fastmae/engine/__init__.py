"""Training engine: step, optimizer, schedule, checkpoints, logging, distributed."""
