"""SMTP: the three listeners (protocol only) and their session handler; the vocabulary is gateway.mail, delivery after the 250 gateway.queue."""
