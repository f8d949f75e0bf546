"""Mayfly against a Temporal that requires mutual TLS: the session's dev server behind a
TLS-terminating proxy that demands a client certificate from the test's CA.

The worker and the starter run as their real entry points (`mayfly worker`, `mayfly starter`)
with the certificates in their config and run one job end to end; without the certificates
they refuse to start, saying why.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.client import Client

from mayfly.config import ConfigError, TemporalSettings
from mayfly.temporal import connect
from simulator import GitHubSimulator
from tests.mayfly_processes import (
    SECRET,
    config_text,
    run_one_job,
    spawn,
    start_starter,
    stop,
    until_ok,
)
from tests.test_metrics import free_port
from tests.tls_proxy import Pki, TlsTerminatingProxy, make_pki

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def mtls_temporal(client: Client, tmp_path: Path) -> AsyncIterator[tuple[TlsTerminatingProxy, Pki]]:
    pki = make_pki(tmp_path / "pki")
    proxy = TlsTerminatingProxy(upstream=client.service_client.config.target_host, pki=pki)
    await proxy.start()
    try:
        yield proxy, pki
    finally:
        await proxy.stop()


async def test_worker_and_starter_run_a_job_over_mutual_tls(
    client: Client,
    mtls_temporal: tuple[TlsTerminatingProxy, Pki],
    task_queue: str,
    pool_name: str,
    tmp_path: Path,
) -> None:
    proxy, pki = mtls_temporal
    simulator = GitHubSimulator(webhook_secret=SECRET, first_job_id=int(time.time() * 1000) % 10**12 * 10 + 3)
    await simulator.start()
    health_port, starter_port = free_port(), free_port()
    config = tmp_path / "mayfly.toml"
    config.write_text(
        config_text(
            address=proxy.address,
            task_queue=task_queue,
            pool=pool_name,
            simulator=simulator,
            state_dir=tmp_path / "local-backend",
            tls={
                "tls_ca_path": pki.ca_cert,
                "tls_cert_path": pki.client_cert,
                "tls_key_path": pki.client_key,
            },
            health_port=health_port,
            starter_port=starter_port,
        )
    )
    worker_log, starter_log = tmp_path / "worker.log", tmp_path / "starter.log"
    worker = await spawn("worker", "--config", str(config), log=worker_log)
    starter: asyncio.subprocess.Process | None = None
    try:
        await until_ok(f"http://127.0.0.1:{health_port}/readyz", worker, worker_log)
        starter = await start_starter(config, starter_port, simulator, starter_log)
        job_id = await run_one_job(client, simulator)
        assert [d.status_code for d in simulator.deliveries() if d.job_id == job_id] == [200, 200, 200]
    finally:
        codes = [await stop(process) for process in (starter, worker) if process is not None]
        await simulator.stop()
    assert codes == [0, 0], (starter_log.read_text()[-2000:], worker_log.read_text()[-2000:])
    print(
        f"\nproxy accepted {len(proxy.accepted_clients)} TLS connections from {set(proxy.accepted_clients)}"
    )
    assert set(proxy.accepted_clients) == {"mayfly-worker"}
    assert len(proxy.accepted_clients) >= 2, "both processes connected through the proxy"


@pytest.mark.parametrize(
    ("case", "tls", "expected"),
    [
        ("no TLS at all", {}, "TLS is off"),
        ("TLS without a client certificate", {"tls_ca_path": "ca_cert"}, "cannot connect to Temporal"),
        (
            "a certificate from another CA",
            {"tls_ca_path": "ca_cert", "tls_cert_path": "stranger_cert", "tls_key_path": "stranger_key"},
            "cannot connect to Temporal",
        ),
    ],
)
async def test_without_the_right_certificates_worker_and_starter_refuse_to_start(
    mtls_temporal: tuple[TlsTerminatingProxy, Pki],
    tmp_path: Path,
    task_queue: str,
    pool_name: str,
    case: str,
    tls: dict[str, str],
    expected: str,
) -> None:
    proxy, pki = mtls_temporal
    simulator = GitHubSimulator(webhook_secret=SECRET)
    await simulator.start()
    try:
        config = tmp_path / "mayfly.toml"
        config.write_text(
            config_text(
                address=proxy.address,
                task_queue=task_queue,
                pool=pool_name,
                simulator=simulator,
                state_dir=tmp_path / "local-backend",
                tls={key: getattr(pki, value) for key, value in tls.items()},
                health_port=free_port(),
                starter_port=free_port(),
            )
        )
        for command in ("worker", "starter"):
            log = tmp_path / f"{command}.log"
            process = await spawn(command, "--config", str(config), log=log)
            async with asyncio.timeout(90):
                code = await process.wait()
            output = log.read_text()
            assert code == 2, f"{case}: {command} exited {code}:\n{output[-2000:]}"
            assert expected in output and proxy.address in output, f"{case}: {command}:\n{output[-2000:]}"
            assert "Traceback" not in output, output[-2000:]
    finally:
        await simulator.stop()
    assert proxy.accepted_clients == []


def test_tls_settings_are_checked_at_start(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    with pytest.raises(ValueError, match="go together"):
        TemporalSettings(tls_cert_path=pki.client_cert)
    with pytest.raises(ValueError, match="no file at"):
        TemporalSettings(tls_ca_path=tmp_path / "absent.pem")
    with pytest.raises(ValueError, match="api_key requires TLS"):
        TemporalSettings(api_key="key", tls=False)
    with pytest.raises(ValueError, match="contradicts"):
        TemporalSettings(tls=False, tls_ca_path=pki.ca_cert)
    with pytest.raises(ValueError, match="namespace"):
        TemporalSettings(namespace="bad namespace!")
    assert TemporalSettings(api_key="key").uses_tls, "an API key turns TLS on"
    assert not TemporalSettings().uses_tls
    assert "s3cr3t-api-key" not in repr(TemporalSettings(api_key="s3cr3t-api-key"))


async def test_connect_reports_an_unreadable_certificate_as_a_config_error(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    settings = TemporalSettings(tls_cert_path=pki.client_cert, tls_key_path=pki.client_key)
    pki.client_key.unlink()
    with pytest.raises(ConfigError, match="cannot read"):
        await connect(settings)
