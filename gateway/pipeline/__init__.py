"""The one path every message takes, whatever door it came in by: parse, policy, security, route, durable queue, deliver."""
