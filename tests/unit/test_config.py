"""Settings: layering (file < env < overrides), defaults, validation errors, and the field metadata the CLI uses."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from app.config import (
    DEMO_MODEL,
    ConfigError,
    ModelConfig,
    Settings,
    field_docs,
    list_fields,
    load_settings,
    scalar_fields,
)
from app.worker.protocol import DIFFUSION_SCHEDULERS, FLOW_SCHEDULERS, SCHEDULERS


def _write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "imagegate.toml"
    path.write_text(text)
    return path


def _load(tmp_path: Path, **kwargs) -> Settings:
    """load_settings with an empty environment and data_dir pinned to tmp_path unless overridden."""
    kwargs.setdefault("environ", {})
    overrides = {"data_dir": str(tmp_path), **kwargs.pop("overrides", {})}
    return load_settings(overrides=overrides, **kwargs)


def _model_error(tmp_path: Path, **fields) -> str:
    model = {"name": "m", "path": "/models/m", **fields}
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, overrides={"models": [model]})
    return str(info.value)


# -- layering ---------------------------------------------------------------------------------------------------


def test_file_env_and_overrides_layer_in_order(tmp_path):
    config = _write_toml(
        tmp_path,
        'host = "10.0.0.1"\nport = 7000\nurl_ttl = 10\nlog_level = "debug"\n',
    )
    env = {"IMAGEGATE_PORT": "7001", "IMAGEGATE_URL_TTL": "20"}
    settings = _load(tmp_path, config_file=config, environ=env, overrides={"url_ttl": 30})

    assert settings.host == "10.0.0.1"  # file only
    assert settings.log_level == "debug"  # file only
    assert settings.port == 7001  # env beats file, and the env string is converted to int
    assert settings.url_ttl == 30  # overrides beat env and file


def test_none_overrides_do_not_mask_lower_layers(tmp_path):
    settings = _load(tmp_path, environ={"IMAGEGATE_PORT": "9100"}, overrides={"port": None})
    assert settings.port == 9100


def test_env_scalars_are_converted_to_their_types(tmp_path):
    env = {"IMAGEGATE_SSE_PING_INTERVAL": "2.5", "IMAGEGATE_MAX_BODY_SIZE": "1234", "IMAGEGATE_HOST": "0.0.0.0"}
    settings = _load(tmp_path, environ=env)
    assert settings.sse_ping_interval == 2.5
    assert settings.max_body_size == 1234
    assert settings.host == "0.0.0.0"


def test_env_models_are_json(tmp_path):
    models = [
        {"name": "a", "path": "/m/a", "devices": ["cuda:0", "cuda:1"]},
        {"name": "b", "path": "/m/b", "default_size": "768x768"},
    ]
    settings = _load(tmp_path, environ={"IMAGEGATE_MODELS": json.dumps(models)})
    assert [m.name for m in settings.resolved_models()] == ["a", "b"]
    assert settings.model("a").devices == ["cuda:0", "cuda:1"]
    assert settings.model("b").default_size == "768x768"
    assert settings.model("missing") is None


def test_env_list_field_with_bad_json_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="IMAGEGATE_MODELS must be JSON"):
        _load(tmp_path, environ={"IMAGEGATE_MODELS": "[{"})


def test_env_scalar_with_wrong_type_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="port"):
        _load(tmp_path, environ={"IMAGEGATE_PORT": "not-a-port"})


def test_config_file_named_by_env(tmp_path):
    config = _write_toml(tmp_path, "port = 8123\n")
    settings = _load(tmp_path, environ={"IMAGEGATE_CONFIG": str(config)})
    assert settings.port == 8123


def test_toml_models_table_array(tmp_path):
    config = _write_toml(
        tmp_path,
        '[[models]]\nname = "sd"\npath = "/m/sd"\ndefault_steps = 25\n\n[[models]]\nname = "xl"\npath = "/m/xl"\n',
    )
    settings = _load(tmp_path, config_file=config)
    assert [(m.name, m.default_steps) for m in settings.models] == [("sd", 25), ("xl", None)]  # None: the family's


def test_json_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"port": 8555}))
    assert _load(tmp_path, config_file=path).port == 8555


# -- defaults ---------------------------------------------------------------------------------------------------


def test_defaults_serve_the_demo_model_under_data_dir(tmp_path):
    settings = _load(tmp_path)
    (model,) = settings.resolved_models()
    assert model.name == DEMO_MODEL
    assert model.demo is True
    assert Path(model.path) == tmp_path.resolve() / "models" / DEMO_MODEL
    assert settings.model(DEMO_MODEL) == model
    assert settings.port == 8000
    assert settings.host == "127.0.0.1"
    assert settings.default_response_format == "b64_json"


def test_data_dir_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={}, overrides={"data_dir": "rel/data"})
    assert Path(settings.data_dir).is_absolute()
    assert Path(settings.data_dir) == (tmp_path / "rel" / "data").resolve()


def test_default_model_config_leaves_schedulers_to_the_family_and_families_use_known_names():
    assert ModelConfig(name="x", path="/p").schedulers is None
    assert all(s in SCHEDULERS for s in (*DIFFUSION_SCHEDULERS, *FLOW_SCHEDULERS))


# -- validation -------------------------------------------------------------------------------------------------


def test_duplicate_model_names(tmp_path):
    with pytest.raises(ConfigError, match="configured twice"):
        _load(tmp_path, overrides={"models": [{"name": "a", "path": "/1"}, {"name": "a", "path": "/2"}]})


def test_unknown_scheduler_lists_known_ones(tmp_path):
    message = _model_error(tmp_path, schedulers=["euler", "warp_drive"])
    assert "warp_drive" in message
    for known in SCHEDULERS:
        assert known in message


def test_unknown_default_scheduler(tmp_path):
    assert "nope" in _model_error(tmp_path, default_scheduler="nope")


def test_default_scheduler_is_added_to_schedulers(tmp_path):
    model = {"name": "m", "path": "/p", "schedulers": ["euler"], "default_scheduler": "ddim"}
    settings = _load(tmp_path, overrides={"models": [model]})
    assert settings.models[0].schedulers == ["euler", "ddim"]


def test_default_scheduler_already_listed_is_not_duplicated(tmp_path):
    model = {"name": "m", "path": "/p", "schedulers": ["euler", "ddim"], "default_scheduler": "ddim"}
    settings = _load(tmp_path, overrides={"models": [model]})
    assert settings.models[0].schedulers == ["euler", "ddim"]


@pytest.mark.parametrize("size", ["big", "512", "512x", "0x512", "512x512x3"])
def test_malformed_default_size(tmp_path, size):
    assert "is not WxH" in _model_error(tmp_path, default_size=size)


@pytest.mark.parametrize("size", ["2048x512", "32x512", "500x512", "512x36"])
def test_default_size_out_of_range_or_not_a_multiple(tmp_path, size):
    message = _model_error(tmp_path, default_size=size, min_side=64, max_side=1024, size_multiple=8)
    assert "outside 64-1024 px, multiples of 8" in message


@pytest.mark.parametrize("device", ["gpu", "tpu:0", ""])
def test_bad_device(tmp_path, device):
    assert "unknown device" in _model_error(tmp_path, devices=[device])


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:3", "mps", "xpu:0"])
def test_good_devices(tmp_path, device):
    settings = _load(tmp_path, overrides={"models": [{"name": "m", "path": "/p", "devices": [device]}]})
    assert settings.models[0].devices == [device]


def test_empty_devices(tmp_path):
    assert "at least one local device, remote worker or upstream" in _model_error(tmp_path, devices=[])


def test_remote_workers_alone_are_enough(tmp_path):
    s = load_settings(
        environ={},
        overrides={
            "data_dir": str(tmp_path),
            "models": [{"name": "m", "path": "/p", "devices": [], "remote_workers": ["gpu1:9000"]}],
        },
    )
    assert s.models[0].remote_workers == ["gpu1:9000"] and s.models[0].devices == []


def test_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="`path` is required"):
        _load(tmp_path, overrides={"models": [{"name": "m"}]})


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"min_side": 512, "max_side": 256}, "min_side <= max_side"),
        ({"default_steps": 0}, "default_steps <= max_steps"),
        ({"default_steps": 200, "max_steps": 100}, "default_steps <= max_steps"),
        ({"max_n": 11}, "max_n must be 1-10"),
        ({"preview": "taesd"}, "taesd_path"),
        ({"preview_downscale": 0}, "preview_downscale"),
        ({"quality_steps": {"ultra": 0.5}}, "quality_steps"),
        ({"quality_steps": {"low": 0}}, "quality_steps"),
        ({"quality_steps": {"low": 1.5}}, "quality_steps"),
    ],
)
def test_other_model_constraints(tmp_path, fields, needle):
    assert needle in _model_error(tmp_path, **fields)


def test_invalid_toml(tmp_path):
    config = _write_toml(tmp_path, "port = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        _load(tmp_path, config_file=config)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        _load(tmp_path, config_file=tmp_path / "absent.toml")


def test_unknown_top_level_field(tmp_path):
    config = _write_toml(tmp_path, "prot = 8000\n")
    with pytest.raises(ConfigError, match="prot"):
        _load(tmp_path, config_file=config)


def test_unknown_model_field(tmp_path):
    assert "colour" in _model_error(tmp_path, colour="blue")


def test_bad_literal_value(tmp_path):
    with pytest.raises(ConfigError, match="log_level"):
        _load(tmp_path, overrides={"log_level": "loud"})


# -- metadata for the CLI ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Settings, ModelConfig])
def test_every_field_is_documented(cls):
    docs = field_docs(cls)
    assert set(docs) == {f.name for f in msgspec.structs.fields(cls)}
    for name, text in docs.items():
        assert text.strip(), f"{cls.__name__}.{name} has no description"


def test_scalar_fields_types():
    fields = scalar_fields()
    assert fields["host"] is str
    assert fields["port"] is int
    assert fields["url_ttl"] is int
    assert fields["max_body_size"] is int
    assert fields["request_timeout"] is float
    assert fields["sse_ping_interval"] is float
    assert fields["log_level"] is str  # a Literal of strings is a string flag
    assert fields["default_response_format"] is str
    assert "models" not in fields  # list fields take JSON, not a flag
    tables = {
        "models",
        "api_keys",
        "users",
        "upstreams",
        "backend_weights",
        "webhook_retry_schedule",
        "training",
    }  # file or JSON env
    assert set(fields) | set(list_fields()) == {f.name for f in msgspec.structs.fields(Settings)} - tables
    assert fields["allow_anonymous"] is bool
    assert set(list_fields()) == {"image_url_allowlist", "cors_origins", "webhook_allowlist"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"offload": "model"}, "offload = model needs GPU devices"),
        ({"offload": "sequential", "devices": ["cuda:0", "cpu"]}, "needs GPU devices"),
        ({"quantization": "int8"}, "is not one of torchao:int8wo"),
        ({"quantization": "bitsandbytes:2bit"}, "is not one of torchao:int8wo"),
        ({"quantization": "torchao:"}, "is not one of torchao:int8wo"),
        ({"quantization": "torchao:int7"}, "is not one of torchao:int8wo"),
        ({"step_cache": "first_block"}, "is not first_block:<threshold>"),
        ({"step_cache": "first_block:-1"}, "is not first_block:<threshold>"),
        ({"step_cache": "teacache:0.1"}, "is not first_block:<threshold>"),
    ],
)
def test_gpu_feature_settings_are_checked(tmp_path, fields, message):
    assert message in _model_error(tmp_path, **fields)


def test_gpu_feature_settings_that_are_valid(tmp_path):
    model = {
        "name": "m",
        "path": "/m",
        "devices": ["cuda:0"],
        "offload": "model",
        "quantization": "bitsandbytes:4bit",
        "step_cache": "first_block:0.12",
        "compile": True,
        "vae_tiling": True,
        "attention_backend": "flash",
    }
    [loaded] = _load(tmp_path, overrides={"models": [model]}).models
    assert (loaded.offload, loaded.quantization, loaded.step_cache, loaded.compile) == (
        "model",
        "bitsandbytes:4bit",
        "first_block:0.12",
        True,
    )
