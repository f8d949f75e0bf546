"""No JIT config appears in plaintext in workflow history, logs or search attributes, even when
a failure message carries it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from temporalio.api.history.v1 import History
from temporalio.client import Client

from mayfly.app.embedded import EmbeddedStack
from mayfly.app.wiring import sealer_for
from mayfly.backends import BackendError, ContainerBackend
from mayfly.config import ConfigError, GitHubSettings, MayflySettings, PoolSettings
from mayfly.github import JitConfig, Runner
from mayfly.models import SealedSecret, job_workflow_id, semaphore_workflow_id
from mayfly.sealing import Sealer, SealingError
from tests.backends import DelegatingBackend


class LeakyBackend(DelegatingBackend):
    """Fails the first spawn with an error that quotes the JIT config, as a careless provider might."""

    def __init__(self, inner: ContainerBackend) -> None:
        super().__init__(inner)
        self.seen: list[str] = []

    async def before_spawn(self, name: str, jit_config: str) -> None:
        self.seen.append(jit_config)
        if len(self.seen) == 1:
            raise BackendError(f"rejected env ACTIONS_RUNNER_INPUT_JITCONFIG={jit_config}")


async def raw_history(client: Client, workflow_id: str) -> bytes:
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    return History(events=history.events).SerializeToString() + history.to_json().encode()


async def test_jit_config_never_appears_in_history_logs_or_search_attributes(
    client: Client,
    task_queue: str,
    pool_name: str,
    state_dir: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    leaky: list[LeakyBackend] = []

    def wrap(inner: ContainerBackend) -> ContainerBackend:
        leaky.append(LeakyBackend(inner))
        return leaky[0]

    stack = EmbeddedStack(
        client, state_dir=state_dir, task_queue=task_queue, pool=pool_name, wrap_backend=wrap
    )
    await stack.start()
    try:
        (job_id,) = stack.queue_jobs(1, duration_s=0.5)
        await stack.wait_jobs_finished([job_id], within_s=120)
        (jit,) = set(leaky[0].seen)
        credentials = json.loads(base64.b64decode(jit))[".credentials"]
        secrets = [jit.encode(), credentials.encode()]
        description = await client.get_workflow_handle(job_workflow_id(job_id)).describe()
        histories = [
            await raw_history(client, job_workflow_id(job_id)),
            await raw_history(client, semaphore_workflow_id(pool_name)),
        ]
    finally:
        await stack.stop()

    assert len(leaky[0].seen) == 2, "the leaky first spawn failed and the retry succeeded"
    assert b"[redacted]" in histories[0], "the failure was recorded, with the secret cut out"
    for history in histories:
        for secret in secrets:
            assert secret not in history
    logs = caplog.text + "".join(capfd.readouterr())
    assert jit not in logs and credentials not in logs
    attributes = str([(pair.key.name, pair.value) for pair in description.typed_search_attributes])
    assert "MayflyRunner" in attributes and jit not in attributes


# --- operator secrets: strong, required where they matter, rotated without breaking jobs ---

ROOT = Path(__file__).resolve().parent.parent
STRONG = "0123456789abcdef0123456789abcdef"  # 32 bytes
ENTRY_POINTS = {
    "worker.py": [sys.executable, str(ROOT / "worker.py")],
    "mayfly worker": [sys.executable, "-m", "mayfly.app.cli", "worker"],
    "mayfly starter": [sys.executable, "-m", "mayfly.app.cli", "starter"],
    "mayfly setup": [sys.executable, "-m", "mayfly.app.cli", "setup"],
    "mayfly status": [sys.executable, "-m", "mayfly.app.cli", "status"],
}
MINIMAL_CONFIG = """
[github]
repository = "acme/widgets"
token = "ghp_example"

[temporal]
address = "127.0.0.1:1"

[[pools]]
name = "cpu"
labels = ["self-hosted"]
max_runners = 1
"""


async def run_entry_point(command: list[str], config: Path, env: dict[str, str]) -> tuple[int, str]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("MAYFLY_")}
    process = await asyncio.create_subprocess_exec(
        *command,
        "--config",
        str(config),
        cwd=ROOT,
        env={**clean, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(60):
        output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode()


@pytest.mark.parametrize(
    ("variable", "value", "field"),
    [
        ("MAYFLY_GITHUB__WEBHOOK_SECRET", "", "github.webhook_secret"),
        ("MAYFLY_GITHUB__WEBHOOK_SECRET", "short-secret", "github.webhook_secret"),
        ("MAYFLY_SECRET_KEY", "", "secret_key"),
        ("MAYFLY_SECRET_KEY", "x" * 31, "secret_key"),
    ],
)
async def test_an_empty_or_short_secret_stops_every_entry_point(
    tmp_path: Path, variable: str, value: str, field: str
) -> None:
    config = tmp_path / "mayfly.toml"
    config.write_text(MINIMAL_CONFIG)
    env = {"MAYFLY_SECRET_KEY": STRONG, "MAYFLY_GITHUB__WEBHOOK_SECRET": STRONG, variable: value}
    results = await asyncio.gather(
        *(run_entry_point(command, config, env) for command in ENTRY_POINTS.values())
    )
    for name, (code, output) in zip(ENTRY_POINTS, results, strict=True):
        assert code == 2, f"{name} exited {code}: {output[-1500:]}"
        assert f"  {field}:" in output and "at least 32 bytes" in output, f"{name}: {output[-1500:]}"
        assert "Traceback" not in output, f"{name}: {output[-1500:]}"
        assert value == "" or value not in output, f"{name} printed the secret"


async def test_a_worker_refuses_to_start_without_secret_key_and_the_starter_without_webhook_secret(
    tmp_path: Path,
) -> None:
    config = tmp_path / "mayfly.toml"
    config.write_text(MINIMAL_CONFIG)
    for name in ("worker.py", "mayfly worker"):
        code, output = await run_entry_point(
            ENTRY_POINTS[name], config, {"MAYFLY_GITHUB__WEBHOOK_SECRET": STRONG}
        )
        assert code == 2 and "secret_key: required" in output, f"{name}: {output[-1500:]}"
        assert "Traceback" not in output
    code, output = await run_entry_point(
        ENTRY_POINTS["mayfly starter"], config, {"MAYFLY_SECRET_KEY": STRONG}
    )
    assert code == 2 and "github.webhook_secret: required" in output, output[-1500:]


def test_sealing_key_is_derived_with_hkdf_not_a_bare_hash() -> None:
    secret = "k" * 32
    sealer = Sealer.from_secrets(secret)
    sealed = sealer.seal("jit", context="runner-1")
    bare_sha256 = hashlib.sha256(secret.encode()).digest()
    with pytest.raises(InvalidTag):
        AESGCM(bare_sha256).decrypt(
            base64.b64decode(sealed.nonce), base64.b64decode(sealed.ciphertext), b"runner-1"
        )
    expected = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=b"mayfly/sealing/v1",
        info=b"aes-256-gcm jit-config sealing key",
    ).derive(secret.encode())
    plaintext = AESGCM(expected).decrypt(
        base64.b64decode(sealed.nonce), base64.b64decode(sealed.ciphertext), b"runner-1"
    )
    assert plaintext == b"jit"


def test_key_rotation_newest_seals_every_configured_key_opens() -> None:
    old, new, unrelated = "o" * 32, "n" * 32, "u" * 32
    before = Sealer.from_secrets(old)
    sealed_before = before.seal("config-sealed-before-rotation", context="r")
    after = Sealer.from_secrets(new, [old])
    sealed_after = after.seal("config-sealed-after-rotation", context="r")

    assert after.primary_key_id == Sealer.from_secrets(new).primary_key_id != before.primary_key_id
    assert sealed_after.key_id == after.primary_key_id
    assert after.open(sealed_before, context="r") == "config-sealed-before-rotation"
    assert after.open(sealed_after, context="r") == "config-sealed-after-rotation"
    # A worker still on the old key alone cannot open what the rotated ones seal...
    with pytest.raises(SealingError, match="previous_secret_keys"):
        before.open(sealed_after, context="r")
    # ...and once the old key is dropped, neither can the rotated one open the old values.
    with pytest.raises(SealingError):
        Sealer.from_secrets(new, [unrelated]).open(sealed_before, context="r")
    with pytest.raises(SealingError, match="authentication"):
        after.open(sealed_before, context="another-runner")


def test_worker_sealer_uses_secret_key_and_previous_secret_keys() -> None:
    settings = MayflySettings(
        github=GitHubSettings(repository="a/b", token="t"),
        pools=[PoolSettings(name="cpu", labels=["x"], max_runners=1)],
        secret_key="n" * 32,
        previous_secret_keys=["o" * 32],
    )
    sealed_by_old = Sealer.from_secrets("o" * 32).seal("v", context="c")
    assert sealer_for(settings).open(sealed_by_old, context="c") == "v"
    with pytest.raises(ConfigError, match="secret_key: required"):
        sealer_for(settings.model_copy(update={"secret_key": None, "previous_secret_keys": []}))
    with pytest.raises(ValueError, match="previous_secret_keys is set but secret_key is not"):
        MayflySettings(
            github=GitHubSettings(repository="a/b", token="t"),
            pools=[PoolSettings(name="cpu", labels=["x"], max_runners=1)],
            previous_secret_keys=["o" * 32],
        )


def test_models_holding_a_secret_leave_it_out_of_repr_and_str() -> None:
    # A model printed in a log line, an f-string or a traceback must not carry the secret.
    runner = Runner(id=1, name="r", status="offline", busy=False)
    jit = JitConfig(runner=runner, encoded_jit_config="JIT-SECRET")
    sealed = SealedSecret(key_id="k1", nonce="NONCE-SECRET", ciphertext="CIPHER-SECRET")
    for model, secrets in ((jit, ["JIT-SECRET"]), (sealed, ["NONCE-SECRET", "CIPHER-SECRET"])):
        for text in (repr(model), str(model), f"{model}"):
            assert not any(secret in text for secret in secrets), text
