"""The nftables rule sets, as scripts (pure functions; :class:`~branchbox.net.nftables.Nft` runs them).

One table per daemon (family ``inet``, name from the settings) holds everything; removing it removes all::

    table inet branchbox
      set blocked4                  the ranges of policy.BLOCKED_V4
      map egress  ifname : verdict  host veth name -> jump to that sandbox's chain
      chain prerouting  (nat)       DNS (udp/tcp 53) from any sandbox -> the host's forwarder
      chain postrouting (nat)       masquerade sandbox traffic leaving by any other interface
      chain input   (filter)        sandbox -> host: replies to the host's own connections and DNS only;
                                    the forwarder's port is closed to everyone but sandboxes
      chain forward (filter)        into a sandbox: replies only; out of a sandbox: its own chain (egress map)
      per sandbox (slot N):
        set aN  (interval)          allow_out CIDRs          set pN (timeout)  addresses of allowed domains
        set dN  (interval)          deny_out CIDRs           set qN (timeout)  addresses of denied domains
        chain sN                    anti-spoofing, then allow > deny > blocked > internet (policy.py)

Base chains use ``policy accept`` and only match branchbox's interfaces, so the host's other traffic and other
tables are untouched (a drop in another table still applies to sandboxes: nftables evaluates every table).
"""

from __future__ import annotations

from branchbox.net.addresses import Slot
from branchbox.net.policy import BLOCKED_V4, NetworkPolicy

PIN_TIMEOUT_S = 3600  # a resolved address of an allowed domain stays allowed this long after the last answer


def ifname(prefix: str, slot: int) -> str:
    return f"{prefix}{slot:x}"


def table_script(table: str, prefix: str, subnet: str, dns_port: int) -> str:
    """(Re)create the daemon's table, empty of sandboxes."""
    wild = f'"{prefix}*"'
    return f"""add table inet {table}
delete table inet {table}
table inet {table} {{
  set blocked4 {{
    type ipv4_addr
    flags interval
    elements = {{ {", ".join(BLOCKED_V4)} }}
  }}
  map egress {{
    type ifname : verdict
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname {wild} meta l4proto {{ tcp, udp }} th dport 53 redirect to :{dns_port}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {subnet} oifname != {wild} masquerade
  }}
  chain input {{
    type filter hook input priority filter - 5; policy accept;
    iifname {wild} jump from_sandbox
    meta l4proto {{ tcp, udp }} th dport {dns_port} drop
  }}
  chain from_sandbox {{
    ct state established,related accept
    meta nfproto ipv4 meta l4proto {{ tcp, udp }} th dport {dns_port} accept
    drop
  }}
  chain forward {{
    type filter hook forward priority filter - 5; policy accept;
    oifname {wild} ct state established,related accept
    oifname {wild} drop
    iifname {wild} iifname vmap @egress
    iifname {wild} drop
  }}
}}
"""


def delete_table_script(table: str) -> str:
    return f"add table inet {table}\ndelete table inet {table}\n"


def _elements(cidrs: tuple[str, ...]) -> str:
    return ", ".join(cidrs)


def _chain_rules(table: str, slot: Slot, policy: NetworkPolicy) -> str:
    n = slot.index
    verdict = "accept" if policy.internet else "drop"
    lines = [
        f"add rule inet {table} s{n} ip saddr != {slot.sandbox} drop",
        f"add rule inet {table} s{n} meta nfproto != ipv4 drop",
        f"add rule inet {table} s{n} ip daddr @p{n} accept",
        f"add rule inet {table} s{n} ip daddr @a{n} accept",
        f"add rule inet {table} s{n} ip daddr @q{n} drop",
        f"add rule inet {table} s{n} ip daddr @d{n} drop",
        f"add rule inet {table} s{n} ip daddr @blocked4 drop",
        f"add rule inet {table} s{n} {verdict}",
    ]
    if policy.allow_out.cidrs:
        lines.append(f"add element inet {table} a{n} {{ {_elements(policy.allow_out.cidrs)} }}")
    if policy.deny_out.cidrs:
        lines.append(f"add element inet {table} d{n} {{ {_elements(policy.deny_out.cidrs)} }}")
    return "\n".join(lines) + "\n"


def add_sandbox_script(table: str, prefix: str, slot: Slot, policy: NetworkPolicy) -> str:
    n = slot.index
    sets = "\n".join(
        f"add set inet {table} {name}{n} {{ type ipv4_addr; flags {flags}; }}"
        for name, flags in (("a", "interval"), ("d", "interval"), ("p", "timeout"), ("q", "timeout"))
    )
    return (
        f"{sets}\nadd chain inet {table} s{n}\n"
        + _chain_rules(table, slot, policy)
        + f'add element inet {table} egress {{ "{ifname(prefix, n)}" : jump s{n} }}\n'
    )


def update_sandbox_script(table: str, slot: Slot, policy: NetworkPolicy) -> str:
    """Replace the sandbox's policy atomically. Pinned domain addresses are dropped too: names no longer
    allowed must not stay reachable (allowed ones are pinned again at the sandbox's next lookup)."""
    n = slot.index
    flush = "\n".join(f"flush set inet {table} {name}{n}" for name in "adpq")
    return f"{flush}\nflush chain inet {table} s{n}\n" + _chain_rules(table, slot, policy)


def remove_sandbox_script(table: str, prefix: str, slot: Slot) -> str:
    n = slot.index
    sets = "\n".join(f"delete set inet {table} {name}{n}" for name in "adpq")
    return (
        f'delete element inet {table} egress {{ "{ifname(prefix, n)}" }}\n'
        f"flush chain inet {table} s{n}\ndelete chain inet {table} s{n}\n{sets}\n"
    )


def pin_script(table: str, slot: Slot, addresses: list[str], *, allow: bool) -> str:
    """Pin addresses for PIN_TIMEOUT_S from now: add (so it exists), delete, add again, in one transaction, so
    an address pinned before gets a fresh timeout without a moment of not being in the set."""
    name = f"{'p' if allow else 'q'}{slot.index}"
    plain = ", ".join(addresses)
    timed = ", ".join(f"{a} timeout {PIN_TIMEOUT_S}s" for a in addresses)
    return (
        f"add element inet {table} {name} {{ {timed} }}\n"
        f"delete element inet {table} {name} {{ {plain} }}\n"
        f"add element inet {table} {name} {{ {timed} }}\n"
    )
