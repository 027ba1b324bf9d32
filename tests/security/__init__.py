"""Security tests against the TLS/auth servers of ``scripts/services start tls``."""
