"""The one path every message takes, whatever door it came in by: parse, policy, security, route, then hand to the durable queue (gateway.queue)."""
