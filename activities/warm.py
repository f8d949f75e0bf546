"""What a warm pool asks Temporal about its runners' workflows."""

from __future__ import annotations

from temporalio import activity

from activities.owners import owner_running


class WarmPoolActivities:
    @activity.defn(name="warm.closed_runners")
    async def closed_runners(self, workflow_ids: list[str]) -> list[str]:
        """Those of the warm runners' workflows that are no longer running: an operator may
        terminate one, and then it never reports that it is gone."""
        closed = []
        for workflow_id in workflow_ids:
            activity.heartbeat(workflow_id)
            if not await owner_running(workflow_id):
                closed.append(workflow_id)
        return closed
