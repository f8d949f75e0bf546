"""Encoding of the simulator's JIT runner configuration.

Mirrors the real format: ``encoded_jit_config`` is base64 of a JSON object that maps file
names (``.runner``, ``.credentials``) to base64 file contents. Kept stdlib-only because the
simulated runner program imports it and should start fast.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any


class JitConfigError(ValueError):
    """The blob is not a JIT config this simulator could have produced."""


@dataclass(frozen=True)
class JitConfig:
    agent_id: int
    agent_name: str
    server_url: str
    secret: str
    work_folder: str = "_work"


def _b64json(obj: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode()


def _unb64json(text: str) -> dict[str, Any]:
    decoded = json.loads(base64.b64decode(text, validate=True))
    if not isinstance(decoded, dict):
        raise JitConfigError("expected a JSON object")
    return decoded


def encode(config: JitConfig) -> str:
    runner_file = {
        "agentId": config.agent_id,
        "agentName": config.agent_name,
        "poolId": 1,
        "poolName": "Default",
        "serverUrl": config.server_url,
        "gitHubUrl": config.server_url,
        "workFolder": config.work_folder,
        "ephemeral": True,
        "disableUpdate": True,
    }
    credentials_file = {"scheme": "OAuthAccessToken", "data": {"token": config.secret}}
    return _b64json({".runner": _b64json(runner_file), ".credentials": _b64json(credentials_file)})


def decode(blob: str) -> JitConfig:
    try:
        files = _unb64json(blob.strip())
        runner_file = _unb64json(str(files[".runner"]))
        credentials_file = _unb64json(str(files[".credentials"]))
        return JitConfig(
            agent_id=int(runner_file["agentId"]),
            agent_name=str(runner_file["agentName"]),
            server_url=str(runner_file["serverUrl"]),
            work_folder=str(runner_file.get("workFolder", "_work")),
            secret=str(credentials_file["data"]["token"]),
        )
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        # json.JSONDecodeError and UnicodeDecodeError are ValueErrors too.
        raise JitConfigError(f"malformed JIT config: {exc}") from exc
