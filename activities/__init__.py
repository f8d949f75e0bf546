"""Temporal activities: every call to GitHub, a container backend or the Temporal API."""
