"""The model registry's store and CLI on real SQLite and PostgreSQL stores: versions, sha256, model card,
golden outputs, aliases, rollback, lineage, bad input, corrupted artifacts, concurrent registration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from test_registry_helpers import ARCH, exported, postgres_databases, spec, store_uri  # noqa: F401
from vision.core.errors import ConfigurationError, NotFound
from vision.registry.golden import Golden
from vision.registry.package import ONNX, WEIGHTS, ArtifactCorrupted
from vision.registry.store import RegistryError, RegistryStore
from vision.config.uri import ModelUri, parse_model_uri
from vision.config.settings import ModelConfig

# ImageNet answers of the bundled weights on the default golden photos: espresso, tabby, missile, moped.
REAL_TOP1 = [967, 281, 657, 665]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store(request, tmp_path_factory) -> RegistryStore:
    uri, root = store_uri(request.param, tmp_path_factory.mktemp(f"registry-{request.param}"), request)
    return RegistryStore(uri, root)


@pytest.fixture(scope="module")
def lite(store, exported):
    """`lite` version 1 (bundled weights, lineage tags) and version 2 (seeded random weights)."""
    v1 = store.register("lite", ModelConfig.parse_spec(spec("real", exported)),
                        lineage={"job_id": "job-7", "base_model": ARCH, "dataset_fingerprint": "sha256:abc"},
                        description="bundled ImageNet weights")
    v2 = store.register("lite", ModelConfig.parse_spec(spec("random", exported)))
    return v1, v2


def test_a_version_carries_artifacts_sha256_card_golden_and_lineage(store, lite, tmp_path):
    v1, v2 = lite
    assert (v1.version, v2.version) == ("1", "2")
    files = set(v1.sha256)
    assert {WEIGHTS, ONNX, "card.json", "spec.json", "golden/golden.json", "golden/outputs.npz"} <= files
    assert sum(f.startswith("golden/") and f.endswith(".png") for f in files) == 4
    assert v1.lineage == {"job_id": "job-7", "base_model": ARCH, "dataset_fingerprint": "sha256:abc"}
    assert v1.description == "bundled ImageNet weights"
    package = store.download("lite", "1", tmp_path / "v1")
    assert package.card["architecture"] == ARCH and package.card["num_classes"] == 1000
    assert [o["name"] for o in package.card["outputs"]][:2] == ["logits", "embedding"]
    assert package.card["preset"]["name"] == "torchvision" and package.card["random_weights"] is False
    golden = Golden.load(package.root)
    assert golden.top1 == REAL_TOP1, "golden outputs are recorded on real photos with the version's export"
    assert golden.outputs["logits"].shape == (4, 1000) and golden.outputs["embedding"].shape == (4, 1280)
    assert golden.tags is not None and all(golden.tags), "an ImageNet model tags (WordNet hierarchy): tag sets recorded"
    assert store.download("lite", "2", tmp_path / "v2").card["random_weights"] is True
    # Lineage: the MLflow run that produced the version, with its params.
    lineage = store.lineage(v1)
    assert lineage["run_id"] == v1.run_id and lineage["params"]["vision.arch"] == ARCH and lineage["job_id"] == "job-7"


def test_a_registration_can_name_the_training_run(store, exported):
    """The run a training job logged (params, metric curves) becomes the version's lineage."""
    client = store.client
    run = client.create_run(store._experiment_id, run_name="finetune")
    for step, loss in enumerate([2.0, 1.2, 0.9]):
        client.log_metric(run.info.run_id, "train_loss", loss, step=step)
    client.log_param(run.info.run_id, "lr", "0.01")
    client.set_terminated(run.info.run_id)
    info = store.register("tuned", ModelConfig.parse_spec(spec("real", exported)), run_id=run.info.run_id)
    lineage = store.lineage(info)
    assert info.run_id == run.info.run_id
    assert lineage["params"]["lr"] == "0.01" and lineage["curves"] == {"train_loss": 3}
    with pytest.raises(NotFound):
        store.register("tuned", ModelConfig.parse_spec(spec("real", exported)), run_id="0" * 32)


def test_promote_resolve_and_rollback(store, lite):
    assert store.promote("lite", "1", "production") is None
    assert store.resolve(parse_model_uri("models:/lite@production")) == "1"
    assert store.promote("lite", "2", "production") == "1"
    assert store.resolve("models:/lite@production") == "2"
    assert store.resolve("models:/lite/1") == "1", "a pinned URI resolves to its version"
    assert store.rollback("lite", "production") == ("2", "1")
    assert store.resolve(ModelUri("lite", alias="production")) == "1"
    with pytest.raises(RegistryError, match="no earlier version"):
        store.rollback("lite", "production")
    # Aliases are independent of each other.
    store.promote("lite", "2", "staging")
    assert store.model("lite").aliases == {"production": "1", "staging": "2"}


@pytest.mark.parametrize("name", ["", "bad name", "../etc", ".hidden", "-x", "a/b", "x" * 101])
def test_bad_model_names_are_refused(store, name):
    with pytest.raises(ConfigurationError, match="not valid"):
        store.versions(name)


@pytest.mark.parametrize("alias", ["latest", "v3", "has space", "1st", ""])
def test_bad_aliases_are_refused(store, lite, alias):
    with pytest.raises(ConfigurationError, match="not valid"):
        store.promote("lite", "1", alias)


def test_missing_models_versions_and_aliases_are_clear_errors(store, lite):
    with pytest.raises(NotFound, match="nope"):
        store.model("nope")
    with pytest.raises(NotFound, match="version 99"):
        store.version("lite", "99")
    with pytest.raises(NotFound, match="alias 'canary'"):
        store.resolve("models:/lite@canary")
    with pytest.raises(ConfigurationError, match="positive integers"):
        store.version("lite", "two")
    with pytest.raises(NotFound):
        store.promote("lite", "99", "production")


def test_a_corrupted_artifact_is_detected_on_download(store, exported, tmp_path):
    info = store.register("corrupt", ModelConfig.parse_spec(spec("real", exported)))
    stored = Path(info.source.removeprefix("file://")) / WEIGHTS
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorrupted, match="weights.pt has sha256"):
        store.download("corrupt", info.version, tmp_path / "dl")
    assert not (tmp_path / "dl").exists(), "a corrupted download must not be left where serving would find it"
    (Path(info.source.removeprefix("file://")) / "golden" / "golden.json").unlink()
    with pytest.raises(ArtifactCorrupted, match="golden/golden.json is missing"):
        store.download("corrupt", info.version, tmp_path / "dl")


def test_delete_version_is_refused_while_an_alias_points_at_it(store, exported):
    a = store.register("deleteme", ModelConfig.parse_spec(spec("real", exported)))
    b = store.register("deleteme", ModelConfig.parse_spec(spec("random", exported)))
    store.promote("deleteme", b.version, "production")
    with pytest.raises(RegistryError, match="alias"):
        store.delete_version("deleteme", b.version)
    store.delete_version("deleteme", a.version)
    assert [v.version for v in store.versions("deleteme")] == [b.version]
    # A rollback skips versions deleted since.
    with pytest.raises(RegistryError, match="no earlier version"):
        store.rollback("deleteme", "production")
    store.delete_version("deleteme", b.version, force=True)
    assert store.versions("deleteme") == []


def test_concurrent_registrations_from_several_processes_get_distinct_versions(store, exported, tmp_path):
    """Four `vision registry register` processes at once (the schema already exists): four versions, each
    with its own intact artifacts."""
    n = 4
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "vision.cli", "registry", "--registry-uri", store.uri, "--artifact-root",
             store.artifact_root, "register", "concurrent", "--model", spec("real" if i % 2 else "random", exported),
             "--job-id", f"job-{i}", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        )
        for i in range(n)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    versions = sorted(int(json.loads(out)["version"]) for out, _ in results)
    assert versions == list(range(1, n + 1))
    jobs = {v.version: v.lineage["job_id"] for v in store.versions("concurrent")}
    assert sorted(jobs.values()) == [f"job-{i}" for i in range(n)]
    for version in jobs:
        store.download("concurrent", version, tmp_path / "dl" / version)  # every sha256 checks out
    assert not any(tmp_path.iterdir()) or {p.name for p in tmp_path.iterdir()} == {"dl"}, "nothing written to the cwd"


class Cli:
    """`vision registry ...` run in this process (the CLI's main), output captured."""

    def __init__(self, store: RegistryStore, capsys: pytest.CaptureFixture[str]) -> None:
        self.store, self.capsys = store, capsys

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        from vision.cli import main

        self.capsys.readouterr()
        try:
            code = main(["registry", "--registry-uri", self.store.uri, "--artifact-root", self.store.artifact_root, *args])
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
        out, err = self.capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)


def test_cli_register_list_show_promote_rollback_verify_delete(store, exported, capsys):
    """The issue's own example: `vision registry register lite --model efficientnet_lite0`, then the rest."""
    cli = Cli(store, capsys)
    out = cli("register", "clilite", "--model", ARCH, "--job-id", "j1")
    assert out.returncode == 0, out.stderr
    assert "registered clilite version 1" in out.stdout
    out = cli("register", "clilite", "--model", spec("random", exported), "--promote", "staging")
    assert out.returncode == 0 and "version 2 (alias staging)" in out.stdout, out.stderr
    listing = cli("list")
    assert "clilite  versions=2 latest=2  aliases: @staging=2" in listing.stdout
    show = cli("show", "clilite", "1")
    assert show.returncode == 0, show.stderr
    assert "arch efficientnet_lite0" in show.stdout and "golden: 4 images, top-1 [967, 281, 657, 665]" in show.stdout
    assert "model.onnx" in show.stdout and "job_id: j1" in show.stdout
    shown = json.loads(cli("show", "clilite", "--json").stdout)
    assert [v["version"] for v in shown["versions"]] == ["1", "2"]
    promote = cli("promote", "clilite", "1", "--alias", "production")
    assert promote.returncode == 0 and "clilite@production: (new) -> 1" in promote.stdout, promote.stderr
    promote = cli("promote", "clilite", "2", "--alias", "production")
    assert promote.returncode == 0 and "1 -> 2" in promote.stdout, promote.stderr
    rollback = cli("rollback", "clilite", "--alias", "production")
    assert rollback.returncode == 0 and "2 -> 1 (rolled back)" in rollback.stdout
    verify = cli("verify", "clilite", "2")
    assert verify.returncode == 0 and "golden outputs reproduce" in verify.stdout, verify.stderr
    refused = cli("delete-version", "clilite", "1")
    assert refused.returncode == 1 and "alias" in refused.stderr
    # Bad input: clear messages, non-zero exits.
    for args, code, message in (
        (("show", "nope"), 1, "not found"),
        (("show", "clilite", "9"), 1, "version 9"),
        (("promote", "clilite", "1", "--alias", "latest"), 1, "reserved"),
        (("promote", "clilite", "1"), 2, "--alias"),
        (("register", "bad name", "--model", ARCH), 1, "not valid"),
        (("register", "x", "--model", "arch=efficientnet_lite0,colour=blue"), 2, "invalid model spec"),
        (("register", "x", "--model", "models:/lite@production"), 2, "not a registry URI"),
        (("register", "x", "--model", ARCH, "--golden", "/nonexistent.png"), 2, "cannot read golden image"),
        (("register", "x", "--model", "arch=resnet50"), 1, "no bundled weights"),
    ):
        result = cli(*args)
        assert result.returncode == code and message in result.stderr, (args, result.stderr)


def test_cli_promote_refuses_a_corrupted_version(store, exported, capsys):
    cli = Cli(store, capsys)
    info = store.register("clicorrupt", ModelConfig.parse_spec(spec("real", exported)))
    onnx = Path(info.source.removeprefix("file://")) / ONNX
    onnx.write_bytes(onnx.read_bytes()[:-10])
    result = cli("promote", "clicorrupt", info.version, "--alias", "production")
    assert result.returncode == 1 and "model.onnx has sha256" in result.stderr and "not moved" in result.stderr
    with pytest.raises(NotFound):
        store.resolve("models:/clicorrupt@production")
    verify = cli("verify", "clicorrupt", info.version)
    assert verify.returncode == 1 and "FAILS" in verify.stderr


def test_the_default_store_lives_under_the_data_dir_and_writes_nothing_to_the_cwd(tmp_path, exported):
    """No --registry-uri: a SQLite file under $XDG_DATA_HOME/vision-serving/registry, artifacts beside it."""
    cwd, data = tmp_path / "cwd", tmp_path / "data"
    cwd.mkdir()
    env = {**os.environ, "XDG_DATA_HOME": str(data)}
    env.pop("VISION_REGISTRY_URI", None)
    result = subprocess.run(
        [sys.executable, "-m", "vision.cli", "registry", "register", "dflt", "--model", spec("real", exported)],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert list(cwd.iterdir()) == [], "nothing may land in the current directory (no ./mlruns)"
    registry = data / "vision-serving" / "registry"
    assert (registry / "registry.db").is_file()
    assert any((registry / "artifacts").rglob(WEIGHTS))


def test_serving_does_not_import_mlflow_without_registry_models():
    code = (
        "import sys, vision.cli, vision.runners.server, vision.serving.loading, vision.config.settings, vision.config.uri;"
        "from vision.config.settings import ModelConfig; ModelConfig.parse_spec('models:/lite@production');"
        "assert 'mlflow' not in sys.modules and 'sqlalchemy' not in sys.modules, sorted(m for m in sys.modules if 'mlflow' in m)[:5]"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("spec_text", "message"),
    [
        ("models:/lite", "name an alias or a version"),
        ("models:/lite@latest", "reserved"),
        ("models:/lite/zero", "positive integers"),
        ("models:/bad name@production", "not valid"),
        ("registry=models:/lite@production,arch=resnet50", "come from the registered version"),
        ("registry=models:/lite@production,name=other", "registered name"),
    ],
)
def test_bad_registry_model_specs_are_refused(spec_text, message):
    with pytest.raises((ConfigurationError, ValueError), match=message):
        ModelConfig.parse_spec(spec_text)


def test_registry_model_specs_parse():
    alias = ModelConfig.parse_spec("models:/lite@production")
    assert (alias.registry, alias.served_name) == ("models:/lite@production", "lite")
    pinned = ModelConfig.parse_spec("registry=models:/lite/3,backend=torch")
    assert (pinned.version, pinned.backend) == ("3", "torch")


def test_registry_models_and_settings_come_from_env_vars_too(monkeypatch):
    from vision.config.settings import ServeSettings

    monkeypatch.setenv("VISION_MODELS", json.dumps([{"registry": "models:/lite@production"}]))
    monkeypatch.setenv("VISION_REGISTRY_URI", "postgresql://postgres@127.0.0.1:5432/registry")
    monkeypatch.setenv("VISION_REGISTRY_POLL_S", "2.5")
    settings = ServeSettings()
    assert settings.models[0].registry == "models:/lite@production" and settings.models[0].served_name == "lite"
    assert settings.registry_uri.startswith("postgresql://") and settings.registry_poll_s == 2.5
