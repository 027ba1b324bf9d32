"""NATS and JetStream sources and sinks for natsconn."""
