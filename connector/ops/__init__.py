"""Operations: metrics, the health/metrics HTTP endpoint, structured logs."""
