"""PostgreSQL sink (COPY, insert, upsert) and sources (outbox table, LISTEN) for natsconn."""
