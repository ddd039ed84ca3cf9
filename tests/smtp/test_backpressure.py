"""Back-pressure through the real submission listener: while local delivery is ``local_backlog_limit``
messages behind, a message is not queued; past ``local_backlog_wait_seconds`` the client is told
451 4.3.2 (RFC 3463 3.4, excessive load) and keeps its copy; once delivery catches up the same
message is accepted and reaches the mailbox.

Local delivery is held still by stopping its workers and scheduling a message that never finishes,
so nothing depends on how fast the machine is.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.queue.store import QueueStore
from tests.smtp.conftest import logged_in, message
from tests.smtp.gateway_thread import GatewayThread

HELD = "held-by-the-test"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayThread]:
    gateway = GatewayThread(tmp_path_factory.mktemp("backpressure") / "data", overrides={"smtp": {
        "local_backlog_limit": 1, "local_backlog_wait_seconds": 0.5}}).start()
    yield gateway
    gateway.stop()


def _submit(gw: GatewayThread, subject: str) -> tuple[int, bytes]:
    sender, recipient = gw.account("PER", 0), gw.account("PER", 1)
    with logged_in(gw, sender.address, sender.password) as client:
        client.mail(sender.address)
        assert client.rcpt(recipient.address)[0] == 250
        return client.data(message(sender.address, recipient.address, subject))


def test_a_full_backlog_answers_451_4_3_2_and_queues_nothing_until_delivery_catches_up(gw: GatewayThread) -> None:
    assert gw.queue is not None and gw.db is not None
    delivery = gw.queue.local
    queue = QueueStore(gw.db)

    async def hold() -> None:
        await delivery.stop()               # delivery falls behind: nothing leaves the backlog
        delivery.schedule(HELD)             # ... which is full (limit 1)
    gw.call(hold())
    queued_before = gw.call(queue.queued_message_ids())

    code, reply = _submit(gw, "pendant la surcharge")
    assert code == 451 and reply.startswith(b"4.3.2"), reply
    assert gw.call(queue.queued_message_ids()) == queued_before          # nothing was queued for it

    async def catch_up() -> None:
        delivery._done(HELD)                # the held message "delivered": room again
        await delivery.start()
    gw.call(catch_up())
    code, reply = _submit(gw, "apres la surcharge")
    assert code == 250, reply
    gw.wait_delivered()
    recipient = gw.account("PER", 1)
    assert any(b"apres la surcharge" in raw for raw in gw.inbox(recipient.address))
    assert not any(b"pendant la surcharge" in raw for raw in gw.inbox(recipient.address))
