"""Configuration fails at start, naming the bad field."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from mayfly.config import ConfigError, MayflySettings, load_settings

GOOD = """
[github]
repository = "acme/widgets"
token = "ghp_example"
webhook_secret = "0123456789abcdef0123456789abcdef"

[[pools]]
name = "gpu"
labels = ["self-hosted", "linux", "gpu"]
max_runners = 4

[[pools]]
name = "cpu"
labels = ["self-hosted", "linux"]
max_runners = 10
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mayfly.toml"
    path.write_text(text)
    return path


def test_toml_loads_and_routes_jobs_to_the_most_specific_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MAYFLY_CONFIG", raising=False)
    settings = load_settings(write(tmp_path, GOOD))
    gpu, cpu = settings.pools
    assert [pool.name for pool in settings.pools] == ["gpu", "cpu"]
    assert settings.pool_for(["self-hosted", "GPU"]) is gpu
    # The GPU pool is listed first and covers these labels too, but has a label they lack.
    assert settings.pool_for(["linux"]) is cpu
    assert settings.pool_for(["self-hosted", "Linux"]) is cpu
    assert settings.pool_for(["self-hosted", "windows"]) is None
    assert settings.github.runners_path == "/repos/acme/widgets/actions/runners"
    assert "ghp_example" not in repr(settings)


def test_env_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAYFLY_TEMPORAL__ADDRESS", "temporal.internal:7233")
    settings = load_settings(write(tmp_path, GOOD))
    assert settings.temporal.address == "temporal.internal:7233"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (("max_runners = 4", "max_runners = -1"), "pools.0.max_runners"),
        (('name = "gpu"', 'name = "GPU pool"'), "pools.0.name"),
        (('repository = "acme/widgets"', 'repository = "acme"'), "github.repository"),
        (('labels = ["self-hosted", "linux", "gpu"]', "labels = []"), "pools.0.labels"),
        (('name = "cpu"', 'name = "gpu"'), "pools"),
        (("[github]", "workflow_task_slots = 1\n[github]"), "workflow_task_slots"),
    ],
)
def test_a_bad_field_is_named(tmp_path: Path, change: tuple[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(write(tmp_path, GOOD.replace(*change)))
    assert f"  {field}:" in str(raised.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml")


def test_exactly_one_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MAYFLY_CONFIG", raising=False)
    pools = [{"name": "cpu", "labels": ["x"], "max_runners": 1}]
    with pytest.raises(ValueError, match="exactly one"):
        MayflySettings(github={"repository": "a/b", "organization": "a", "token": "t"}, pools=pools)
    with pytest.raises(ValueError, match="exactly one"):
        MayflySettings(github={"token": "t"}, pools=pools)


SCOPES = """
[github]
app_id = 42
private_key = "-----BEGIN PRIVATE KEY-----"
webhook_secret = "0123456789abcdef0123456789abcdef"

[[scopes]]
name = "acme"
organization = "acme"
installation_id = 11

[[scopes]]
name = "globex"
organization = "globex"
installation_id = 12
runner_group_id = 7

[[scopes]]
name = "solo"
repository = "solo/tool"
token = "ghp_solo"
api_url = "https://ghe.example.com/api/v3/"
max_calls_per_second = 2

[[pools]]
name = "gpu"
labels = ["self-hosted", "linux", "gpu"]
max_runners = 4
scopes = ["acme"]
runner_group_id = 3

[[pools]]
name = "cpu"
labels = ["self-hosted", "linux"]
max_runners = 10
"""


def test_scopes_each_get_their_own_target_credential_and_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MAYFLY_CONFIG", raising=False)
    settings = load_settings(write(tmp_path, SCOPES))
    acme, globex, solo = (settings.github_scopes[name] for name in ("acme", "globex", "solo"))
    assert acme.uses_app and acme.installation_id == 11 and acme.token is None
    assert acme.runners_path == "/orgs/acme/actions/runners"
    assert globex.installation_id == 12 and globex.runner_group_id == 7 and acme.runner_group_id == 1
    assert not solo.uses_app and solo.token is not None and solo.token.get_secret_value() == "ghp_solo"
    assert solo.api_url == "https://ghe.example.com/api/v3" and acme.api_url == "https://api.github.com"
    assert solo.runners_path == "/repos/solo/tool/actions/runners"
    assert solo.max_calls_per_second == 2 and acme.max_calls_per_second == 10
    # Names, queues and workflow ids never meet across scopes.
    assert [settings.runner_prefix(name) for name in settings.github_scopes] == ["acme", "globex", "solo"]
    queues = {settings.temporal.github_queue(name) for name in settings.github_scopes}
    assert len(queues) == 3 and settings.temporal.github_task_queue not in queues
    gpu, cpu = settings.pools
    # A pool serves only the scopes it names (all of them when it names none).
    assert settings.pool_for(["gpu"], "acme") is gpu
    assert settings.pool_for(["gpu"], "globex") is None
    assert settings.pool_for(["linux"], "solo") is cpu
    assert settings.pool_scopes(cpu) == ["acme", "globex", "solo"]
    assert "ghp_solo" not in repr(settings)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('scopes = ["acme"]', 'scopes = ["initech"]'), "pools.0.scopes: no scope named initech"),
        (('name = "globex"', 'name = "acme"'), "scope names must be unique, repeated: acme"),
        (('name = "globex"', 'name = "Globex Inc"'), "scopes.1.name"),
        (('repository = "solo/tool"', 'repository = "solo/tool"\norganization = "solo"'), "exactly one"),
        (('token = "ghp_solo"', 'token = "ghp_solo"\ninstallation_id = 3'), "token or installation_id, not"),
        (("app_id = 42", 'repository = "a/b"\napp_id = 42'), "remove github.repository"),
        (('name = "cpu"', 'name = "cpu"\nmin_idle = 1'), "a warm pool (min_idle > 0) registers"),
    ],
)
def test_a_bad_scope_is_named(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(write(tmp_path, SCOPES.replace(*change)))
    assert message in str(raised.value)


def test_an_installation_needs_the_app(tmp_path: Path) -> None:
    text = SCOPES.replace("app_id = 42\n", "").replace('private_key = "-----BEGIN PRIVATE KEY-----"\n', "")
    with pytest.raises(ConfigError) as raised:
        load_settings(write(tmp_path, text))
    assert "scope acme: installation_id needs the App" in str(raised.value)


def test_json_logs_are_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import logging

    from mayfly.logs import configure_logging

    root = logging.getLogger()
    # The handler writes to this test's captured stderr, which is closed after the test: later
    # tests would log into a closed stream.
    saved_handlers, saved_level = root.handlers[:], root.level
    configure_logging("json")
    try:
        logging.getLogger("mayfly.test").warning("slot %s released", "r-1")
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    entry = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert entry["level"] == "WARNING" and entry["message"] == "slot r-1 released"
    assert entry["logger"] == "mayfly.test"


def test_log_format_and_metrics_address_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(write(tmp_path, 'log_format = "xml"\nmetrics_bind_address = "9464"\n' + GOOD))
    assert "  log_format:" in str(raised.value) and "  metrics_bind_address:" in str(raised.value)


@pytest.mark.parametrize(
    ("github", "message"),
    [
        ('repository = "a/b"\ntoken = "t"\napp_id = 1', "either github.token or the github.app_* fields"),
        ('repository = "a/b"\napp_id = 1\ninstallation_id = 2', "needs github.app_id"),
        ('repository = "a/b"\napp_id = 1\ninstallation_id = 2\nprivate_key_path = "/nope.pem"', "no file at"),
    ],
)
def test_github_app_settings_are_checked(tmp_path: Path, github: str, message: str) -> None:
    text = f'[github]\n{github}\n\n[[pools]]\nname = "cpu"\nlabels = ["x"]\nmax_runners = 1\n'
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(write(tmp_path, text))


def pools_settings(tmp_path: Path, *pools: tuple[str, list[str]]) -> MayflySettings:
    github = GOOD.split("[[pools]]")[0]
    listed = "".join(
        f'[[pools]]\nname = "{name}"\nlabels = {labels!r}\nmax_runners = 1\n' for name, labels in pools
    )
    return load_settings(write(tmp_path, github + listed.replace("'", '"')))


@pytest.mark.parametrize(
    ("job_labels", "expected"),
    [
        (["self-hosted"], "small"),  # every pool covers it: the one with fewest extra labels
        (["self-hosted", "linux", "x64"], "x64"),
        (["self-hosted", "gpu"], "gpu-a"),  # a tie on extras: config order decides
        (["gpu", "linux"], "gpu-a"),
        (["self-hosted", "arm64"], None),
    ],
)
def test_routing_takes_the_pool_with_fewest_extra_labels_and_breaks_ties_by_order(
    tmp_path: Path, job_labels: list[str], expected: str | None
) -> None:
    settings = pools_settings(
        tmp_path,
        ("gpu-a", ["self-hosted", "linux", "gpu"]),
        ("gpu-b", ["self-hosted", "linux", "gpu"]),
        ("x64", ["self-hosted", "linux", "x64"]),
        ("small", ["self-hosted", "linux"]),
    )
    pool = settings.pool_for(job_labels)
    assert (pool.name if pool else None) == expected


def test_loading_a_file_does_not_leak_into_settings_built_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CI once failed a later test's in-code settings because an earlier load left its file's
    # github.token merged into them through the process environment.
    monkeypatch.delenv("MAYFLY_CONFIG", raising=False)
    assert load_settings(write(tmp_path, GOOD)).github.repository == "acme/widgets"
    assert "MAYFLY_CONFIG" not in os.environ
    later = MayflySettings(
        github={"organization": "globex", "token": "t" * 8},
        pools=[{"name": "cpu", "labels": ["linux"], "max_runners": 1}],
    )
    assert later.github.repository is None
    assert later.github.organization == "globex"
