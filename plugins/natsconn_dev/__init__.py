"""Development plugins: a ``generate`` source, a ``drop`` sink, small transforms.

For smoke tests, the quickstart and the engine-only benchmark.
"""
