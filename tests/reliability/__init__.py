"""The fault matrix (scripts/reliability) and its small CI version."""
