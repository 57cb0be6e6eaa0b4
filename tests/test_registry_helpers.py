"""Shared by the registry tests: stores on SQLite and PostgreSQL, pre-exported ONNX files, model specs.

Registration exports ONNX (seconds per EfficientNet-Lite0); the tests that do not test the export pass a
file exported once per session (`onnx=`), which registration copies as it would a training job's export.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


ARCH = "efficientnet_lite0"


def postgres_available() -> bool:
    try:
        import psycopg

        psycopg.connect(host="127.0.0.1", port=5432, dbname="postgres", user="postgres", connect_timeout=3).close()
        return True
    except Exception:
        return False


def _pg_admin():  # noqa: ANN202 - psycopg connection
    import psycopg

    return psycopg.connect(host="127.0.0.1", port=5432, dbname="postgres", user="postgres", connect_timeout=5,
                           autocommit=True)


@pytest.fixture(scope="session")
def postgres_databases() -> Iterator[list[str]]:
    """Names of the PostgreSQL databases created by this session (dropped at its end)."""
    if not postgres_available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not reachable at 127.0.0.1:5432 (.ci/run starts it)")
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    created: list[str] = []
    yield created
    conn = _pg_admin()
    with conn.cursor() as cur:
        for name in created:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


def store_uri(kind: str, tmp: Path, request: pytest.FixtureRequest) -> tuple[str, str]:
    """(registry URI, artifact root) of a new, empty store of `kind` ("sqlite" or "postgresql") under `tmp`:
    a SQLite file, or a fresh PostgreSQL database (dropped at the end of the session)."""
    if kind == "sqlite":
        return f"sqlite:///{tmp / 'registry.db'}", str(tmp / "artifacts")
    created = request.getfixturevalue("postgres_databases")
    name = f"vision_registry_test_{uuid.uuid4().hex[:12]}"
    conn = _pg_admin()
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    created.append(name)
    return f"postgresql://postgres@127.0.0.1:5432/{name}", str(tmp / "artifacts")


@pytest.fixture(scope="session")
def exported(onnx_cache: Path) -> dict[str, Path]:
    """ONNX exports of the bundled EfficientNet-Lite0 ("real") and of its seeded random weights ("random"),
    from the session's export cache (so modules importing this fixture share one export)."""
    from vision.serving.loading import cached_onnx, model_card
    from vision.config.settings import ModelConfig, ServeSettings

    out = {}
    for key, spec in (("real", ARCH), ("random", f"arch={ARCH},weights=random")):
        config = ModelConfig.parse_spec(spec)
        settings = ServeSettings(models=[config], onnx_cache=onnx_cache)
        card, weights = model_card(config, settings)
        out[key] = cached_onnx(config, settings, card, weights)
    return out


def spec(kind: str, exported: dict[str, Path]) -> str:
    """A model spec registering the bundled ("real") or seeded random ("random") weights with a ready export."""
    weights = "" if kind == "real" else ",weights=random"
    return f"arch={ARCH}{weights},onnx={exported[kind]}"


def real_and_random_store(root: Path, exported: dict[str, Path], name: str):  # noqa: ANN201 - RegistryStore
    """A SQLite store under `root` where `name` 1 = bundled ImageNet weights (coffee -> 967 espresso),
    2 = seeded random weights, and @production -> 1."""
    from vision.registry.store import RegistryStore
    from vision.config.settings import ModelConfig

    store = RegistryStore(f"sqlite:///{root / 'registry.db'}", str(root / "artifacts"))
    store.register(name, ModelConfig.parse_spec(spec("real", exported)))
    store.register(name, ModelConfig.parse_spec(spec("random", exported)))
    store.promote(name, "1", "production")
    return store


def shuffled_head_weights(path: Path) -> Path:
    """The bundled weights with the classifier's rows permuted: the same network, every class renamed."""
    import torch

    from vision.models import create_model

    module = create_model(ARCH)
    state = module.state_dict()
    head = [k for k, v in state.items() if v.ndim == 2 and v.shape[0] == 1000]
    assert head, "no 1000-row head found"
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(0))
    for key in head:
        state[key] = state[key][perm].clone()
        bias = key.rsplit(".", 1)[0] + ".bias"
        if bias in state:
            state[bias] = state[bias][perm].clone()
    torch.save(state, path)
    return path
