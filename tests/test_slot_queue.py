"""The semaphore's waiter queue on its own: lanes, order, and what survives packing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from mayfly.models import AcquireRequest
from mayfly.slot_queue import ReleasedMemory, WaiterQueue, pack, unpack

START = datetime(2026, 1, 1, tzinfo=UTC)


def request(name: str, *, front: bool = False, second: int = 0, job_id: int | None = None) -> AcquireRequest:
    return AcquireRequest(
        request_id=f"job-{name}/run",
        holder_workflow_id=f"job-{name}",
        holder_run_id="run",
        requested_at=START + timedelta(seconds=second),
        front=front,
        job_id=job_id,
    )


def test_the_front_lane_is_served_first_each_lane_in_arrival_order() -> None:
    queue = WaiterQueue()
    for second, (name, front) in enumerate(
        [("a", False), ("b", False), ("x", True), ("c", False), ("y", True)]
    ):
        assert queue.push(request(name, front=front, second=second))
    assert queue.head(10) == ["job-x/run", "job-y/run", "job-a/run", "job-b/run", "job-c/run"]
    assert queue.position_of("job-a") == 3
    queue.remove("job-y/run")
    assert [queue.pop_first().holder_workflow_id for _ in range(len(queue))] == [
        "job-x",
        "job-a",
        "job-b",
        "job-c",
    ]


def test_the_back_lane_serves_older_jobs_first_then_requests_for_no_job_in_arrival_order() -> None:
    queue = WaiterQueue()
    arrivals = [("n1", None), ("j30", 30), ("j10", 10), ("n2", None), ("j20", 20), ("j40", 40)]
    for second, (name, job_id) in enumerate(arrivals):
        assert queue.push(request(name, second=second, job_id=job_id))
    assert queue.push(request("f", front=True, second=9, job_id=99))
    expected = [
        "job-f/run",
        "job-j10/run",
        "job-j20/run",
        "job-j30/run",
        "job-j40/run",
        "job-n1/run",
        "job-n2/run",
    ]
    assert queue.head(10) == expected
    queue.remove("job-j20/run")
    queue.remove("job-n1/run")
    queue.remove("job-absent/run")
    assert queue.push(request("j15", second=10, job_id=15))
    assert [queue.pop_first().holder_workflow_id for _ in range(len(queue))] == [
        "job-f",
        "job-j10",
        "job-j15",
        "job-j30",
        "job-j40",
        "job-n2",
    ]
    assert not queue


def test_a_duplicate_is_not_queued_twice_in_either_lane_and_a_full_queue_refuses() -> None:
    queue = WaiterQueue(limit=2)
    assert queue.push(request("a"))
    assert queue.push(request("a", front=True))
    assert len(queue) == 1
    assert queue.push(request("b", front=True))
    assert not queue.push(request("c"))
    assert queue.head(5) == ["job-b/run", "job-a/run"]


def test_packing_keeps_both_lanes_their_order_and_the_released_ids() -> None:
    queue = WaiterQueue(
        [
            request("a", second=1),
            request("x", front=True, second=2),
            request("b", second=3),
            request("j", second=4, job_id=7),
        ]
    )
    released = ReleasedMemory(["job-old/run"])
    waiters, kept = unpack(pack(queue, released))
    assert [(w.holder_workflow_id, w.front, w.requested_at, w.job_id) for w in waiters] == [
        ("job-x", True, START + timedelta(seconds=2), None),
        ("job-j", False, START + timedelta(seconds=4), 7),
        ("job-a", False, START + timedelta(seconds=1), None),
        ("job-b", False, START + timedelta(seconds=3), None),
    ]
    assert WaiterQueue(waiters).head(4) == queue.head(4)
    assert kept == ["job-old/run"]
