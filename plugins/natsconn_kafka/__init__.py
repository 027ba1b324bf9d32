"""Kafka source and sink for natsconn, on aiokafka."""
