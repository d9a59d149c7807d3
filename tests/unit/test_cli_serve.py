"""``imagegate serve`` refuses to start on settings it cannot serve, before binding anything."""

from __future__ import annotations

import json

from click.testing import CliRunner

from app.cli import main


def test_serve_refuses_an_upstream_whose_key_variable_is_unset(tmp_path, monkeypatch):
    monkeypatch.delenv("IMAGEGATE_CONFIG", raising=False)
    monkeypatch.delenv("VENDOR_KEY_FOR_TEST", raising=False)
    config = tmp_path / "settings.json"
    config.write_text(
        json.dumps(
            {
                "models": [{"name": "vendor-model", "devices": []}],
                "upstreams": [
                    {
                        "name": "vendor",
                        "base_url": "https://images.example.com/v1",
                        "api_key_env": "VENDOR_KEY_FOR_TEST",
                        "models": {"vendor-model": "gpt-image-1"},
                    }
                ],
            }
        )
    )
    result = CliRunner().invoke(main, ["serve", "--config", str(config), "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 2
    assert "VENDOR_KEY_FOR_TEST (upstream vendor)" in result.output
