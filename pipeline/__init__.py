"""Data, DeepSpeed training, checkpoints and MLflow tracking for ADN super-nets (built in later issues)."""
