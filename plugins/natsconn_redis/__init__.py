"""Redis sources and sinks for natsconn: streams, pub/sub, lists and keys."""
