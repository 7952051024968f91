"""Sandbox networking: veth pairs, per-sandbox nftables egress policies, a resolve-and-pin DNS forwarder.

See docs/networking.md. The Manager owns one :class:`Network`; nothing else changes network state.
"""

from branchbox.net.policy import BLOCKED_V4, BLOCKED_V6, NetworkPolicy
from branchbox.net.service import Attachment, Network
from branchbox.net.settings import NetworkSettings

__all__ = ["BLOCKED_V4", "BLOCKED_V6", "Attachment", "Network", "NetworkPolicy", "NetworkSettings"]
