"""Latency lookup tables per target device, accuracy of every mask, and the Ray Tune + Optuna Pareto search."""
