"""SMTP: the three listeners on aiosmtpd (protocol only), the reply catalogue, outbound delivery, DSN and MX routing."""
