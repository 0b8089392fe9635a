"""Reading the outside world: checkpoints (one module per format behind ``Format``, Hub model
folders included), architectures named by ``--arch``, sample data (one module per kind of
source), and the checks that keep an untrusted file from running code. Nothing here runs a
forward pass."""
