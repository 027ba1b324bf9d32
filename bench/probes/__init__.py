"""Timed senders, receivers and round trips per system (see bench/timed.py)."""
