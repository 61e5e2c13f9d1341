"""Shared utilities: task table, checkpoints, distributed helpers, schedulers, logging, arguments."""
