"""Training and evaluation of ATLAS models, apart from serving (the engine never imports this).

- ``trainer``: the losses, the optimiser and `run_training` (`atlas train CONFIG`);
- ``tasks``: the synthetic long-context tasks, generated on the fly;
- ``evaluation``: accuracy against context length (`atlas eval`);
- ``cli``: the `train` and `eval` commands, which the `atlas` command line mounts.
"""
