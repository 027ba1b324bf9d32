"""natsconn's benchmark harness: pipelines against the raw clients, in one run.

Run ``python -m bench run --help``; see bench/README.md. Not a test suite:
nothing here is timed by pytest.
"""
