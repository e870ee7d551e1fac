"""Baselines that share the tasks' data and metrics and the engine's loop: SFT and PPO."""
