"""One module per system: its Endpoints (raw legs, far-side counters) and its pairs.

See bench/README.md, "Adding a system or a pair".
"""
