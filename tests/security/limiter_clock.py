"""What the limiter tests share: a small policy and a clock the test moves by hand."""

from gateway.security.auth_limiter import LimiterPolicy

POLICY = LimiterPolicy(failures_before_delay=3, source_failures_before_delay=10, first_delay=1, max_delay=60,
                       forget_after=3600)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now
