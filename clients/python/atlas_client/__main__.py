"""``python -m atlas_client``: the client command line."""

from .cli import app

app()
