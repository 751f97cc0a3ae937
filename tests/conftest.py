"""Shared fixtures: one Ray instance per test session, tiny model families built once (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    """The Ray token file exists before any test process starts Ray: with ``-n 2`` two workers would otherwise race
    to create it, and one's head would be left holding a token the file no longer has."""
    from distmerge.jobs import ensure_token_file

    if not hasattr(config, "workerinput"):  # the controller (or the only process without xdist)
        ensure_token_file(os.environ)


def pytest_collection_modifyitems(items):
    """A test that uses the session's Ray carries the ``ray`` marker, so ``-m "not ray"`` is the fast tier."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _ray_only_where_marked(request, monkeypatch):
    """A ``ray`` test shares the session's Ray (a merge would otherwise start and stop an embedded one per call);
    any other test that tries to start Ray fails and says so, which keeps ``-m "not ray"`` free of Ray."""
    if request.node.get_closest_marker("ray") is not None:
        request.getfixturevalue("ray_cluster")
        return
    import ray

    def refuse(*args, **kwargs):
        pytest.fail("this test starts Ray: mark it @pytest.mark.ray (or use the ray_cluster fixture)", pytrace=False)

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from distmerge.jobs import ensure_token_file

    ensure_token_file(os.environ)  # Ray would create ~/.ray/auth_token readable by every user
    # A private local instance even if a cluster is running; 4 logical CPUs so 4 fractional workers fit.
    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=256 * 1024**2,
             log_to_driver=False)
    yield
    from distmerge.engine.pool import release_warm_workers

    release_warm_workers()
    ray.shutdown()


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny Llama base and two experts (base + seeded deltas), several shards each."""
    from distmerge.tiny_models import build_family

    return build_family(tmp_path_factory.mktemp("llama"), "llama", experts=2)


@pytest.fixture(scope="session")
def llama_family_vocab(tmp_path_factory) -> tuple[Path, list[Path]]:
    """Like llama_family, but expert_1 adds a [PAD] token (129 rows against 128), as WizardMath does."""
    from distmerge.tiny_models import build_family

    return build_family(tmp_path_factory.mktemp("llama_vocab"), "llama", experts=2, extra_tokens={1: ("[PAD]",)})


def merge_config(base: Path | None, experts: list[Path], method: str, **parameters) -> dict:
    """A distmerge config dict naming the experts e0, e1, ..."""
    config = {"models": [{"model": str(p), "name": f"e{i}"} for i, p in enumerate(experts)], "method": method,
              "parameters": parameters, "out_shard_size": "40KB"}
    if base is not None:
        config["base_model"] = str(base)
    return config
