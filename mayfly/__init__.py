"""Mayfly: durable orchestration of ephemeral GitHub Actions runners."""
