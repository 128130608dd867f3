"""The engine: one training path over DeepSpeed, evaluation, checkpoints and run artifacts."""
