"""Measuring: batches fed to the model, the statistics pass (per-layer input statistics in
eval and train mode, through a runtime's observation), the output tally of both modes, and
the reduction of all of it across torchrun ranks."""
