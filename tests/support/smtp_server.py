"""A real SMTP server for the owner-alert tests: aiosmtpd's handler keeping what it accepted, and the
Airflow SMTP connection (plain SMTP on 127.0.0.1) that reaches it."""

from __future__ import annotations

import email
import email.policy
import json
import socket


class Inbox:
    """An aiosmtpd handler keeping every message it accepted."""

    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []
        self.recipients: list[list[str]] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's hook name)
        self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        self.recipients.append(list(envelope.rcpt_tos))
        return "250 Message accepted for delivery"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def smtp_conn(port: int) -> str:
    extra = {"disable_ssl": True, "disable_tls": True, "from_email": "cdr-webhook@example.com", "timeout": 5}
    return json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": port, "extra": extra})
