"""Settings: env prefix, config file sections, readable errors."""

from __future__ import annotations

import pytest

from conspo.settings import (
    ApiSettings,
    GeneratorSettings,
    LearnerSettings,
    SettingsError,
    VerifierSettings,
    load,
)


def test_env_vars_with_prefix_override_defaults(monkeypatch):
    monkeypatch.setenv("CONSPO_LR", "3e-5")
    monkeypatch.setenv("CONSPO_OBJECTIVE", "grpo")
    monkeypatch.setenv("CONSPO_RUN", "exp1")
    s = load(LearnerSettings)
    assert (s.lr, s.objective, s.run) == (3e-5, "grpo", "exp1")
    assert s.keys.prompts == "conspo:{exp1}:prompts"


def test_config_file_top_level_then_service_section(monkeypatch, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        'run = "filerun"\nmax_staleness = 2\n'
        "[learner]\nlr = 1e-5\nmax_staleness = 0\n"
        "[generator]\ngroup_size = 4\n"
    )
    monkeypatch.setenv("CONSPO_CONFIG", str(cfg))
    learner, gen = load(LearnerSettings), load(GeneratorSettings)
    assert (learner.run, learner.lr, learner.max_staleness) == ("filerun", 1e-5, 0)
    assert (gen.run, gen.group_size, gen.max_staleness) == ("filerun", 4, 2)
    monkeypatch.setenv("CONSPO_MAX_STALENESS", "5")  # env beats the file
    assert load(LearnerSettings).max_staleness == 5
    assert load(LearnerSettings, max_staleness=7).max_staleness == 7  # explicit beats env


def test_yaml_config_file(monkeypatch, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("verifier:\n  processes: 3\n  timeout_s: 2.5\n")
    monkeypatch.setenv("CONSPO_CONFIG", str(cfg))
    s = load(VerifierSettings)
    assert (s.processes, s.timeout_s) == (3, 2.5)


def test_errors_name_the_env_variables(monkeypatch):
    monkeypatch.setenv("CONSPO_GROUP_SIZE", "0")
    monkeypatch.setenv("CONSPO_TOP_P", "abc")
    with pytest.raises(SettingsError) as err:
        load(GeneratorSettings)
    text = str(err.value)
    assert "CONSPO_GROUP_SIZE" in text
    assert "CONSPO_TOP_P" in text


def test_broken_config_file_is_a_settings_error(monkeypatch, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("this is = = not toml")
    monkeypatch.setenv("CONSPO_CONFIG", str(cfg))
    with pytest.raises(SettingsError, match="cannot parse"):
        load(LearnerSettings)
    monkeypatch.setenv("CONSPO_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(SettingsError, match="no such file"):
        load(LearnerSettings)


def test_api_requires_a_token_unless_explicitly_disabled(monkeypatch):
    monkeypatch.delenv("CONSPO_API_TOKEN", raising=False)
    with pytest.raises(SettingsError, match="CONSPO_API_TOKEN"):
        load(ApiSettings)
    assert load(ApiSettings, auth_disabled=True).api_token is None
    token = load(ApiSettings, api_token="s3cret-token").api_token
    assert token.get_secret_value() == "s3cret-token"
    assert "s3cret" not in repr(load(ApiSettings, api_token="s3cret-token"))
    with pytest.raises(SettingsError, match="at least 8"):
        load(ApiSettings, api_token="short")
