"""The ``allowed_networks`` setting's CIDR list: one parser for the setting and the egress guard. Pure.

The settings check the list when they are read, and the egress guard (:mod:`cdr_webhook.deliver.egress`)
lets these networks through: both parse it here, so a list the settings accept is the list the guard uses.
"""

from __future__ import annotations

import ipaddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_NETWORKS_ENV = "AIRFLOW__CDR_WEBHOOK__ALLOWED_NETWORKS"


def parse_networks(raw: str) -> tuple[Network, ...]:
    """Parse the comma-separated CIDR list of ``ALLOWED_NETWORKS``; an empty string allows nothing."""
    networks = []
    for entry in (part.strip() for part in raw.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=True))
        except ValueError as err:
            raise ValueError(f"{ALLOWED_NETWORKS_ENV}: {entry!r} is not a CIDR network ({err})") from None
    return tuple(networks)
