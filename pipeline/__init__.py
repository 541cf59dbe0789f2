"""Data (shards on disk or over the network), DeepSpeed training from one process to many nodes, checkpoints, MLflow."""
