"""Replay recorded histories against today's workflow code: a change that would break a running
workflow fails here. Regenerate with `python -m tests.record_histories`, with intent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from mayfly.temporal import DATA_CONVERTER
from workflows.runner_job import RunnerJobWorkflow
from workflows.slot_semaphore import SlotSemaphoreWorkflow
from workflows.sweeper import SweeperWorkflow
from workflows.warm_pool import WarmPoolWorkflow
from workflows.warm_runner import WarmRunnerWorkflow

HISTORIES = sorted(Path(__file__).with_name("histories").glob("*.json"))


def workflow_type(path: Path) -> str:
    first = json.loads(path.read_text())["events"][0]
    return str(first["workflowExecutionStartedEventAttributes"]["workflowType"]["name"])


def test_histories_cover_every_workflow() -> None:
    assert {workflow_type(path) for path in HISTORIES} == {
        "RunnerJob",
        "SlotSemaphore",
        "Sweeper",
        "WarmPool",
        "WarmRunner",
    }


@pytest.mark.parametrize("path", HISTORIES, ids=[path.stem.split("@")[0] for path in HISTORIES])
async def test_recorded_history_replays(path: Path) -> None:
    workflow_id = path.stem.split("@", 1)[1]
    history = WorkflowHistory.from_json(workflow_id, path.read_text())
    replayer = Replayer(
        workflows=[
            RunnerJobWorkflow,
            SlotSemaphoreWorkflow,
            SweeperWorkflow,
            WarmPoolWorkflow,
            WarmRunnerWorkflow,
        ],
        data_converter=DATA_CONVERTER,
    )
    await replayer.replay_workflow(history)
