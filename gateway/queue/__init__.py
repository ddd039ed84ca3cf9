"""Everything that happens to a message after the 250: the durable queue.

The spool (sealed files), the queue's rows, local delivery into the mail
store, the outbound worker to other operators, delivery status notifications
(RFC 3464) and the mail the gateway writes itself, with the administrator's
operations on them (``gateway queue``).
"""
