"""`python -m atlas.training CONFIG`: `atlas train` as a module, for launchers that start modules,
e.g. `torchrun --nproc-per-node 4 -m atlas.training configs/train/shakespeare.toml`."""

import typer

from .cli import train

if __name__ == "__main__":
    typer.run(train)
