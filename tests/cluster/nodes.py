"""Ports and sizes of the simulated cluster's nodes."""

from __future__ import annotations

import socket

WORKER_CPUS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_ports() -> dict:
    """Free ports for a node's agents: their defaults are taken when another Ray instance runs here."""
    return {k: free_port() for k in ("dashboard_agent_listen_port", "runtime_env_agent_port", "metrics_agent_port",
                                     "metrics_export_port")}
