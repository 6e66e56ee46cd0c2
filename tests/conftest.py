"""The fixtures the test modules share: the models, the stores and the servers they run on, and the
texts they read."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from atlas.engine import Atlas
from atlas.engine.store import EmbeddedStore, RedisStore, StoreSettings, open_store

from . import helpers
from .store_helpers import RedisServer, make_store, start_cluster

# Parallel workers (pytest-xdist's -n, `make test`) share the cores: more threads than cores stall.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(4, (os.cpu_count() or 1) // _WORKERS)))


# -- models ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def atlas() -> Atlas:
    """The tiny float32 model (tests/helpers.tiny_config) that the engine and runtime tests check."""
    return helpers.tiny_atlas(torch.float32)


@pytest.fixture(scope="module")
def fast_atlas() -> Atlas:
    """The fast model of the server tests (tests/helpers.FAST): a protocol test reads megabytes."""
    return helpers.fast_atlas()


@pytest.fixture(scope="session")
def fast_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fast model saved as a checkpoint, for servers started as processes (its name is the
    model's id there)."""
    return helpers.write_checkpoint(tmp_path_factory.mktemp("ckpt") / "fast-atlas")


# -- stores ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStore]:
    """The embedded store (the server's default), one for the module; sessions keep tests apart."""
    s = open_store(StoreSettings(redis_url=None, data_dir=tmp_path_factory.mktemp("store"),
                                 part_bytes=64 << 10))
    yield s
    s.close()


@pytest.fixture(scope="session")
def standalone_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server on a loopback port for the whole run (skipped where it is not installed)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


@pytest.fixture
def key_prefix() -> str:
    """A key prefix of its own, so that tests sharing a redis-server never see each other's keys."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def redis_store(standalone_redis: RedisServer, key_prefix: str) -> Iterator[RedisStore]:
    s = make_store(standalone_redis.url, key_prefix)
    yield s
    s.close()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    """A 3-master Redis Cluster on loopback ports (skipped without redis-server and redis-cli)."""
    nodes = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield nodes
    for n in nodes:
        n.kill()


@pytest.fixture
def cluster_store(redis_cluster: list[RedisServer], key_prefix: str) -> Iterator[RedisStore]:
    s = make_store(redis_cluster[0].url, key_prefix, cluster=True)
    yield s
    s.close()


# -- texts -----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def utf8_text() -> bytes:
    """Text of many scripts (two-, three- and four-byte characters): the shared UTF-8 sample where
    this machine has it, else the one in tests/data."""
    return (helpers.shared_text("utf8-demo.txt") or helpers.TEST_DATA / "utf8-sample.txt").read_bytes()
