"""docker-compose.yml and the Dockerfile, checked without a Docker engine (none runs here).

The file is validated against the Compose specification's JSON schema (the copy that the
check-jsonschema package ships), and its Mayfly services are run as processes: their commands,
environment and order exactly as the file gives them, against the session's Temporal dev server
standing in for the `temporal` service and the GitHub simulator standing in for GitHub.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import os
import re
import signal
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from temporalio.client import Client

from mayfly.models import job_workflow_id
from simulator import GitHubSimulator
from simulator.app_keys import generate_app_key
from tests.test_metrics import free_port

ROOT = Path(__file__).resolve().parent.parent
MAYFLY_SERVICES = ("mayfly-setup", "worker", "starter")
ONE_SHOT = ("temporal-schema", "temporal-namespace", "mayfly-setup")
# What an operator's .env holds for the file (a GitHub App: no MAYFLY_GITHUB__TOKEN).
DOT_ENV = {
    "POSTGRES_PASSWORD": "postgres-password-for-the-test",
    "MAYFLY_SECRET_KEY": "k" * 64,
    "MAYFLY_GITHUB__WEBHOOK_SECRET": "w" * 64,
}
_VARIABLE = re.compile(r"\$(?:\$|\{(?P<braced>[^}]+)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def compose_text() -> str:
    return (ROOT / "docker-compose.yml").read_text()


def compose() -> dict[str, Any]:
    data = yaml.safe_load(compose_text())
    assert isinstance(data, dict)
    return data


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's variable syntax: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        expression = match.group("braced") or match.group("bare")
        name, operator, argument = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-?])?(.*)", expression).groups()  # type: ignore[union-attr]
        current = env.get(name)
        empty = current is None or (operator is not None and operator.startswith(":") and current == "")
        if operator in (":-", "-"):
            return argument if empty else str(current)
        if operator in (":?", "?"):
            if empty:
                raise KeyError(f"{name}: {argument}")
            return str(current)
        return current or ""

    return _VARIABLE.sub(substitute, value)


def resolved_environment(service: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """The container's environment: interpolated values, and valueless keys taken from the
    shell or .env when set there (compose leaves them unset otherwise)."""
    resolved: dict[str, str] = {}
    for name, value in (service.get("environment") or {}).items():
        if value is None:
            if name in env:
                resolved[name] = env[name]
        else:
            resolved[name] = interpolate(str(value), env)
    return resolved


def published_ports(service: dict[str, Any], env: Mapping[str, str]) -> list[tuple[str, str]]:
    """(host address, container port) of each published port, with compose's defaults."""
    published = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            published.append((str(port.get("host_ip", "0.0.0.0")), str(port["target"])))
            continue
        parts = interpolate(str(port), env).split(":")
        host_ip = parts[0] if len(parts) == 3 else "0.0.0.0"
        published.append((host_ip, parts[-1]))
    return published


# ----------------------------------------------------------------------------- the file itself


def compose_spec_schema() -> dict[str, Any]:
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads(vendored.joinpath("compose-spec.json").read_text())
    return schema


def test_the_file_validates_against_the_compose_specification() -> None:
    schema = compose_spec_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema, format_checker=validator_class.FORMAT_CHECKER)
    errors = [f"{error.json_path}: {error.message}" for error in validator.iter_errors(compose())]
    assert errors == []
    # The schema is strict enough to catch a misspelt key.
    broken = compose()
    broken["services"]["worker"]["restart_policy"] = "always"
    assert any("restart_policy" in error.message for error in validator.iter_errors(broken))


def test_no_port_is_published_on_every_interface_by_default() -> None:
    services = compose()["services"]
    published = {
        name: published_ports(service, DOT_ENV) for name, service in services.items() if "ports" in service
    }
    assert {"temporal", "temporal-ui", "starter"} <= set(published)
    for name, ports in published.items():
        for host_ip, port in ports:
            assert host_ip in ("127.0.0.1", "::1"), f"{name} publishes {port} on {host_ip}"
    # The starter can be published for GitHub on purpose, not by accident.
    exposed = published_ports(services["starter"], {**DOT_ENV, "MAYFLY_STARTER_PUBLISH": "192.0.2.7"})
    assert exposed == [("192.0.2.7", "8080")]


def test_services_are_pinned_restartable_and_checked() -> None:
    services: dict[str, dict[str, Any]] = compose()["services"]
    assert {"postgresql", "temporal", "temporal-ui", *MAYFLY_SERVICES, *ONE_SHOT} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "image" in service:
            image = service["image"]
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), (name, image)
            assert "auto-setup" not in image, "temporalio/auto-setup is a development image"
        if name in ONE_SHOT:
            assert service.get("restart") == "on-failure", name
        else:
            assert service.get("restart") == "unless-stopped", name
            assert "test" in service.get("healthcheck", {}), f"{name} has no healthcheck"
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, (name, dependency)
            wanted = "service_completed_successfully" if dependency in ONE_SHOT else "service_healthy"
            assert condition == {"condition": wanted}, (name, dependency)
    for name in MAYFLY_SERVICES:
        assert services[name].get("init") is True, f"{name} must reap its children"


def test_volumes_resolve_and_the_worker_keeps_its_state() -> None:
    data = compose()
    for name, service in data["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source.startswith(("./", "/")) or source in data.get("volumes", {}), (name, volume)
    assert "mayfly-state:/var/lib/mayfly" in data["services"]["worker"]["volumes"]


def test_secrets_come_from_the_environment_and_either_github_credential_works() -> None:
    text = compose_text()
    for variable in ("MAYFLY_GITHUB__WEBHOOK_SECRET", "MAYFLY_SECRET_KEY", "POSTGRES_PASSWORD"):
        assert f"${{{variable}:?" in text, f"{variable} must be required from the environment"
    # A PAT is optional (a GitHub App's key comes as a file): passed when set, unset otherwise.
    assert "${MAYFLY_GITHUB__TOKEN" not in text
    worker = compose()["services"]["worker"]
    for variable in ("MAYFLY_GITHUB__TOKEN", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"):
        assert variable in worker["environment"] and worker["environment"][variable] is None, variable
    assert resolved_environment(worker, DOT_ENV).keys().isdisjoint({"MAYFLY_GITHUB__TOKEN", "MODAL_TOKEN_ID"})
    with_pat = resolved_environment(worker, {**DOT_ENV, "MAYFLY_GITHUB__TOKEN": "github_pat_x"})
    assert with_pat["MAYFLY_GITHUB__TOKEN"] == "github_pat_x"
    assert not re.search(r"(ghp|ghs|github_pat)_[A-Za-z0-9]{10,}", text)
    with pytest.raises(KeyError, match="MAYFLY_SECRET_KEY"):
        resolved_environment(worker, {})


def test_dockerfile_installs_the_runtime_only_as_a_non_root_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.split(r"^FROM\s+", dockerfile, flags=re.MULTILINE)[1:]
    for stage in stages:
        base = stage.split()[0]
        assert re.fullmatch(r"[\w./-]+:\d[\w.-]*", base), base
    final = stages[-1]
    assert "--require-hashes -r requirements.lock" in final
    assert "requirements-dev.lock" not in final, "the image must not install the dev tools"
    assert not re.search(r"^COPY\s+(\S+\s+)*(simulator|tests|bench)\b", dockerfile, re.MULTILINE)
    user = re.findall(r"^USER\s+(\S+)", final, re.MULTILINE)
    assert user and user[-1] not in ("root", "0", "nobody"), user
    # The state volume's mount point is the user's own, and the working directory.
    assert re.search(r"chown .*mayfly:mayfly /var/lib/mayfly", final)
    assert re.search(r"^WORKDIR /var/lib/mayfly$", final, re.MULTILINE)


def test_the_example_config_is_valid_for_the_compose_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mayfly.config import load_settings

    for name in list(os.environ):
        if name.startswith("MAYFLY_"):
            monkeypatch.delenv(name)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "github-app.pem").write_text("a key")
    text = (ROOT / "examples" / "mayfly.toml").read_text().replace("/run/secrets/mayfly", str(secrets))
    (tmp_path / "mayfly.toml").write_text(text)
    for variable, value in resolved_environment(compose()["services"]["worker"], DOT_ENV).items():
        monkeypatch.setenv(variable, value)
    settings = load_settings(tmp_path / "mayfly.toml")
    assert settings.temporal.address == "temporal:7233"
    assert settings.github.uses_app and settings.secret_key is not None


# ----------------------------------------------------------------------------- the file, run


@dataclass
class ServiceProcess:
    """One Mayfly service of the file, run as a process on this host."""

    name: str
    command: list[str]
    env: dict[str, str]
    cwd: Path
    healthcheck: list[str] | None
    process: asyncio.subprocess.Process | None = None
    log: Path | None = None
    rewrites: list[str] = field(default_factory=list)

    async def start(self, logs: Path) -> None:
        self.log = logs / f"{self.name}.log"
        with self.log.open("wb") as out:
            self.process = await asyncio.create_subprocess_exec(
                *self.command, env=self.env, cwd=self.cwd, stdout=out, stderr=asyncio.subprocess.STDOUT
            )

    def output(self) -> str:
        return self.log.read_text()[-3000:] if self.log else ""

    async def healthy(self) -> bool:
        assert self.healthcheck is not None
        check = await asyncio.create_subprocess_exec(
            *self.healthcheck, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        return await check.wait() == 0

    async def until_ready(self, within_s: float) -> None:
        """A one-shot service until it exits 0; a long-running one until its healthcheck passes."""
        assert self.process is not None
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if self.healthcheck is None:
                with contextlib.suppress(TimeoutError):
                    code = await asyncio.wait_for(self.process.wait(), 1.0)
                    assert code == 0, f"{self.name} exited {code}:\n{self.output()}"
                    return
            else:
                assert self.process.returncode is None, f"{self.name} exited:\n{self.output()}"
                if await self.healthy():
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.process.wait(), 0.5)
        raise AssertionError(f"{self.name} not ready within {within_s}s:\n{self.output()}")

    async def stop(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), 30)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


def start_order(services: dict[str, dict[str, Any]]) -> list[str]:
    """The Mayfly services in dependency order, as compose would start them."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order or name not in MAYFLY_SERVICES:
            return
        for dependency in services[name].get("depends_on", {}):
            visit(dependency)
        order.append(name)

    for name in services:
        visit(name)
    return order


@dataclass
class ComposeHost:
    """What the test host gives in place of the compose project: paths for mounts, the
    Temporal address, free loopback ports for the ports a container has to itself."""

    root: Path
    temporal_address: str
    ports: dict[str, str]

    def host_path(self, service: dict[str, Any], container_path: str) -> str:
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if container_path == target or container_path.startswith(target + "/"):
                base = (
                    self.root / source.removeprefix("./")
                    if source.startswith("./")
                    else self.root / "volumes" / source
                )
                return str(base) + container_path[len(target) :]
        return container_path

    def rewrite_address(self, value: str) -> str:
        host, _, port = value.rpartition(":")
        if host == "0.0.0.0" and port in self.ports:
            return f"127.0.0.1:{self.ports[port]}"
        return value


def service_process(
    name: str, service: dict[str, Any], host: ComposeHost, dot_env: Mapping[str, str]
) -> ServiceProcess:
    env = resolved_environment(service, dot_env)
    rewrites = []
    # The `temporal` service is the session's dev server.
    if "MAYFLY_TEMPORAL__ADDRESS" in env:
        assert env["MAYFLY_TEMPORAL__ADDRESS"] == "temporal:7233"
        env["MAYFLY_TEMPORAL__ADDRESS"] = host.temporal_address
        rewrites.append("MAYFLY_TEMPORAL__ADDRESS")
    # A container's 0.0.0.0 is its own interface; on a shared host the loopback and a free port stand for it.
    for variable, value in list(env.items()):
        if re.fullmatch(r"0\.0\.0\.0:\d+", value):
            env[variable] = host.rewrite_address(value)
            rewrites.append(variable)
    if env.get("MAYFLY_STARTER__HOST") == "0.0.0.0":
        env["MAYFLY_STARTER__HOST"] = "127.0.0.1"
        env["MAYFLY_STARTER__PORT"] = host.ports["8080"]
        rewrites.append("MAYFLY_STARTER__HOST/PORT")
    command = [host.host_path(service, part) if part.startswith("/") else part for part in service["command"]]
    assert command[0] == "mayfly"
    command[0] = str(Path(sys.executable).parent / "mayfly")
    home = host.root / "home" / name
    home.mkdir(parents=True, exist_ok=True)
    # The image's own environment: PATH and a home; everything else comes from the file.
    base = {"PATH": os.environ["PATH"], "HOME": str(home)}
    healthcheck = None
    if "healthcheck" in service:
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1] == "python", test
        healthcheck = [sys.executable, *test[2:]]
        for container_port, host_port in host.ports.items():
            healthcheck = [part.replace(f":{container_port}/", f":{host_port}/") for part in healthcheck]
    workdir = Path(host.host_path(service, "/var/lib/mayfly"))
    workdir.mkdir(parents=True, exist_ok=True)
    return ServiceProcess(name, command, {**base, **env}, workdir, healthcheck, rewrites=rewrites)


def config_for_the_test_host(host: ComposeHost, service: dict[str, Any], simulator_url: str) -> str:
    """examples/mayfly.toml with its container paths mapped to the host, GitHub's URL pointed at
    the simulator, and the runners of its pool started locally (Modal's stand-in)."""
    text = (ROOT / "examples" / "mayfly.toml").read_text()
    for container_path in ("/run/secrets/mayfly", "/var/lib/mayfly"):
        text = text.replace(container_path, host.host_path(service, container_path))
    text = text.replace("[github]\n", f'[github]\napi_url = "{simulator_url}"\n', 1)
    head, backend = text.split("[pools.backend]\n", 1)
    assert 'kind = "modal"' in backend
    runner = json.dumps([sys.executable, "-m", "simulator.runner"])
    state = host.host_path(service, "/var/lib/mayfly") + "/local-backend"
    return head + f'[pools.backend]\nkind = "local"\ncommand = {runner}\nstate_dir = "{state}"\n'


@pytest.fixture
async def app_key_pair() -> AsyncIterator[tuple[str, str]]:
    keys = generate_app_key()
    yield keys.private_pem, keys.public_pem


async def test_the_mayfly_services_come_up_in_order_and_run_a_job(
    client: Client, tmp_path: Path, app_key_pair: tuple[str, str]
) -> None:
    services: dict[str, dict[str, Any]] = compose()["services"]
    order = start_order(services)
    assert order == ["mayfly-setup", "worker", "starter"]

    example = tomllib.loads((ROOT / "examples" / "mayfly.toml").read_text())
    private_pem, public_pem = app_key_pair
    simulator = GitHubSimulator(
        owner=example["github"]["repository"].split("/")[0],
        repo=example["github"]["repository"].split("/")[1],
        webhook_secret=DOT_ENV["MAYFLY_GITHUB__WEBHOOK_SECRET"],
        app_id=example["github"]["app_id"],
        app_public_key_pem=public_pem,
        installation_id=example["github"]["installation_id"],
        first_job_id=int(time.time() * 1000) % 10**12 * 10 + 7,
    )
    await simulator.start()
    host = ComposeHost(
        root=tmp_path,
        temporal_address=client.service_client.config.target_host,
        ports={"8080": str(free_port()), "8081": str(free_port()), "9464": str(free_port())},
    )
    # The operator's files beside docker-compose.yml: mayfly.toml and the App's key.
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "github-app.pem").write_text(private_pem)
    (tmp_path / "mayfly.toml").write_text(config_for_the_test_host(host, services["worker"], simulator.url))

    processes = [service_process(name, services[name], host, DOT_ENV) for name in order]
    started: list[ServiceProcess] = []
    try:
        for process in processes:
            await process.start(tmp_path)
            started.append(process)
            await process.until_ready(within_s=90)
        simulator.webhook_url = f"http://127.0.0.1:{host.ports['8080']}/webhook"
        labels = example["pools"][0]["labels"]
        job_id = simulator.queue_job(labels, duration_s=1.0)
        await simulator.wait_for(
            lambda: simulator.job(job_id).status == "completed", 120, description="job completed"
        )
        async with asyncio.timeout(60):
            await client.get_workflow_handle(job_workflow_id(job_id)).result()
        assert simulator.job(job_id).conclusion == "success"
        await simulator.wait_for(lambda: simulator.runners() == [], 60, description="runner deregistered")
        assert simulator.token_exchanges >= 1, "the worker authenticated as the GitHub App"
    finally:
        for process in reversed(started):
            await process.stop()
        await simulator.stop()
    for process in started[1:]:
        assert process.process is not None and process.process.returncode == 0, process.output()
