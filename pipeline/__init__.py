"""Training pipeline: config, trainer, loader, checkpointing, tracking, benchmarks and the CLI."""
