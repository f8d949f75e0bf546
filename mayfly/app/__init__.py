"""Mayfly's entry points, on top of the core, the activities and the workflows: the worker's
wiring, the webhook starter, the command line and the embedded dev stack."""
