"""Training and evaluation of ATLAS models, apart from serving (the engine never imports this).

- ``trainer``: the losses, the optimiser and `run_training` (`atlas train CONFIG`, and
  `torchrun -m atlas.training CONFIG` over several processes);
- ``data``: text corpora (txt, jsonl, parquet) streamed, tokenised, packed and shared out;
- ``distributed``: the process group, DDP / FSDP, the whole states a checkpoint saves;
- ``precision``: bf16 autocast with the memory's inner loop kept in fp32;
- ``tokenizer_trainer``: `atlas tokenizer train`;
- ``tasks``: the synthetic long-context tasks, generated on the fly;
- ``evaluation``: accuracy against context length (`atlas eval`);
- ``authoring``: `atlas init` and `atlas convert`;
- ``cli``: the commands, which the `atlas` command line mounts.
"""
