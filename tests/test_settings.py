"""Configuration: flags and VISION_* environment variables validate into one settings object."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from vision.cli import build_parser
from vision.core.errors import ConfigurationError
from vision.config.settings import ModelConfig, ServeSettings


def test_environment_variables_configure_everything(monkeypatch):
    monkeypatch.setenv("VISION_PORT", "6000")
    monkeypatch.setenv("VISION_BACKEND", "torch")
    monkeypatch.setenv("VISION_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("VISION_MODELS", json.dumps([{"arch": "resnet50", "name": "r50", "version": "3", "weights": "/w.pt"}]))
    settings = ServeSettings()
    assert (settings.port, settings.backend, settings.max_batch_size) == (6000, "torch", 4)
    (model,) = settings.models
    assert (model.served_name, model.version, model.weights) == ("r50", "3", Path("/w.pt"))


def test_flags_win_over_environment(monkeypatch):
    monkeypatch.setenv("VISION_PORT", "6000")
    assert ServeSettings(port=7000).port == 7000


def test_every_settings_field_has_a_serve_flag():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # noqa: SLF001 - introspecting argparse
    dests = {a.dest for a in serve._actions}
    assert set(ServeSettings.model_fields) <= dests


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("efficientnet_lite0", {"arch": "efficientnet_lite0", "version": "1"}),
        ("arch=resnet50,name=r50,version=2,labels=/l.txt", {"arch": "resnet50", "name": "r50", "version": "2", "labels": "/l.txt"}),
    ],
)
def test_model_spec_parsing(spec, expected):
    parsed = ModelConfig.parse_spec(spec).model_dump(exclude_none=True)
    assert {k: str(parsed[k]) for k in expected} == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"backend": "tensorflow"}, "backend"),
        ({"models": []}, "at least one model"),
        ({"models": [ModelConfig(arch="resnet50"), ModelConfig(arch="resnet50")]}, "configured twice"),
        ({"port": 70000}, "port"),
    ],
)
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        ServeSettings(**kwargs)


def test_malformed_model_spec():
    with pytest.raises(ConfigurationError, match="key=value"):
        ModelConfig.parse_spec("arch=resnet50,weights")
    with pytest.raises(ValidationError, match="colour"):
        ModelConfig.parse_spec("arch=resnet50,colour=blue")
