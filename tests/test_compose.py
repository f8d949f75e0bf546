"""docker-compose.yml and the Dockerfile, checked without a Docker engine (none runs here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_every_service_is_pinned_and_has_a_healthcheck() -> None:
    services: dict[str, dict[str, Any]] = compose()["services"]
    assert {"postgresql", "temporal", "temporal-ui", "worker", "starter"} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        if "image" in service:
            image = service["image"]
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), (name, image)
        assert "test" in service.get("healthcheck", {}), f"{name} has no healthcheck"


def test_dependencies_and_volumes_resolve() -> None:
    data = compose()
    services = data["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (name, dependency)
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source.startswith(("./", "/")) or source in data.get("volumes", {}), (name, volume)


def test_secrets_come_from_the_environment() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for variable in ("MAYFLY_GITHUB__TOKEN", "MAYFLY_GITHUB__WEBHOOK_SECRET", "MAYFLY_SECRET_KEY"):
        assert f"${{{variable}:?" in text, f"{variable} must be required from the environment"
    assert not re.search(r"(ghp|ghs|github_pat)_[A-Za-z0-9]{10,}", text)


def test_dockerfile_base_image_is_pinned_and_installs_from_the_lock() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE)
    assert base is not None and re.fullmatch(r"[\w./-]+:\d[\w.-]*", base.group(1)), base
    assert "--require-hashes -r requirements.lock" in dockerfile
    assert re.search(r"^USER\s+(?!root)", dockerfile, re.MULTILINE), "the app must not run as root"
