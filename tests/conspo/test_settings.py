"""Settings: env prefix, config file sections, readable errors."""

from __future__ import annotations

import pytest

from conspo.grading.config import GradeConfig
from conspo.settings import (
    ApiSettings,
    GeneratorSettings,
    LearnerSettings,
    RunSettings,
    RunSettingsMismatchError,
    SettingsError,
    VerifierSettings,
    check_run_settings,
    load,
)
from conspo.state import RunStore
from conspo.testing import heavy_imports


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
    # Here the file sets max_staleness for every service, the generator included: 2 is its
    # own value, which it must then agree on with the learner's 0.
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


# -- run settings: the learner's, announced; generators follow or refuse ------------------------
def test_the_learner_owns_the_run_settings_and_a_generator_follows_by_default():
    learner = load(LearnerSettings, batch_groups=4, weight_sync_dtype="bfloat16")
    run = RunSettings.of(learner)
    assert (run.batch_groups, run.weight_sync_dtype) == (4, "bfloat16")
    gen = load(GeneratorSettings)
    assert (gen.batch_groups, gen.max_staleness, gen.weight_sync_dtype) == (None, None, "auto")
    followed = gen.follow(run)
    assert (followed.weight_sync_dtype, followed.weight_sync_timeout_s) == ("bfloat16", 60.0)
    assert followed.batch_groups is None  # flow control reads the learner's own
    assert followed.followed == {"weight_sync_dtype", "weight_sync_timeout_s"}
    before = gen.follow(None)  # nothing announced yet: the learner's defaults
    assert (before.weight_sync_dtype, before.weight_sync_timeout_s) == ("float32", 60.0)


def test_an_explicit_disagreement_is_an_error_naming_both_values():
    run = RunSettings(batch_groups=4, max_staleness=0, weight_sync_dtype="bfloat16")
    gen = load(GeneratorSettings, batch_groups=8, max_staleness=0, weight_sync_dtype="float16")
    with pytest.raises(RunSettingsMismatchError) as err:
        gen.follow(run)
    text = str(err.value)
    assert (
        "batch_groups: this generator has 8 (CONSPO_BATCH_GROUPS), the learner announced 4" in text
    )
    assert "weight_sync_dtype: this generator has 'float16'" in text and "'bfloat16'" in text
    assert "max_staleness" not in text  # agreeing values are fine
    assert isinstance(err.value, SettingsError)  # exit code 2, like any bad setting
    assert load(GeneratorSettings, batch_groups=4, max_staleness=0).follow(run).batch_groups == 4


def test_a_learner_that_changes_later_stops_a_generator_only_where_it_must():
    started = load(GeneratorSettings).follow(RunSettings())
    assert check_run_settings(started, RunSettings()) == []
    later = check_run_settings(started, RunSettings(weight_sync_timeout_s=30, batch_groups=8))
    assert later == ["weight_sync_timeout_s: the learner now announces 30.0 (60.0 until restart)"]
    with pytest.raises(RunSettingsMismatchError, match="restart the generator to follow"):
        check_run_settings(started, RunSettings(weight_sync_dtype="bfloat16"))


def test_the_announcement_round_trips_through_the_state_hash(redis_client, keys):
    store = RunStore(redis_client, keys)
    assert store.announced_run() is None
    run = RunSettings(batch_groups=3, max_staleness=0, weight_sync_dtype="float16")
    store.announce_run(run)
    assert store.announced_run() == run
    assert store.fields()["batch_groups"] == "3"  # what flow control's script reads
    redis_client.hset(keys.state, "max_staleness", "minus one")  # a foreign writer
    assert store.announced_run() is None


def test_every_grading_knob_is_a_verifier_setting_with_grade_configs_bounds(monkeypatch):
    monkeypatch.setenv("CONSPO_NO_ANSWER_REWARD", "-0.5")
    monkeypatch.setenv("CONSPO_MAX_BOXED_CANDIDATES", "3")  # could not be set before
    monkeypatch.setenv("CONSPO_FALLBACK_PATTERNS", '["ANS=(\\\\d+)"]')
    config = load(VerifierSettings).grade_config
    assert isinstance(config, GradeConfig)
    assert (config.no_answer_reward, config.max_boxed_candidates) == (-0.5, 3)
    assert config.fallback_patterns == (r"ANS=(\d+)",)
    assert set(GradeConfig.model_fields) <= set(VerifierSettings.model_fields)
    monkeypatch.setenv("CONSPO_FALLBACK_PATTERNS", '["no group"]')
    with pytest.raises(SettingsError, match="needs a capture group"):
        load(VerifierSettings)
    monkeypatch.setenv("CONSPO_FALLBACK_PATTERNS", "[not json")
    with pytest.raises(SettingsError, match="fallback_patterns"):
        load(VerifierSettings)


def test_names_are_checked_against_their_registries_when_the_settings_load():
    with pytest.raises(SettingsError) as err:
        load(LearnerSettings, objective="conspoo", eval_set="gsm9k")
    text = str(err.value)
    assert "unknown objective 'conspoo'; valid: conspo, " in text and "grpo" in text
    assert "unknown eval set 'gsm9k'; valid: arith" in text and "gsm8k" in text
    assert load(LearnerSettings, objective="grpo", eval_set="gsm8k").eval_set == "gsm8k"


LIGHT = """
import services.api.main, services.verifier.main
from conspo.settings import ApiSettings, VerifierSettings, load
load(VerifierSettings)
load(ApiSettings, auth_disabled=True)
"""


def test_the_api_and_the_verifier_stay_light():
    """Registry checks import their registries lazily: neither service loads torch."""
    assert heavy_imports(LIGHT, ("torch", "math_verify", "transformers")) == []
    assert "email.mime" in heavy_imports("import email.mime", ("email",))  # it sees imports
