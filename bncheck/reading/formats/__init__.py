"""Checkpoint formats, one module each behind ``base.Format``."""
