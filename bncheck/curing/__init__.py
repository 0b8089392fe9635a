"""Curing: recalibration of running statistics, the ``fix`` pipeline (recalibrate, diagnose
before and after, write a new checkpoint) and freezing BatchNorm for training."""
