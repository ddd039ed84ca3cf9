"""Operating the gateway: Prometheus metrics, /health and /ready, structured logs, `gateway status`."""
