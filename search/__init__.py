"""Latency tables and the Pareto search of skip masks for a target device (built in later issues)."""
