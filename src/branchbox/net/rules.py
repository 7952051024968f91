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
        sets aN, dN/eN, oN (interval) allow_out CIDRs, deny_out CIDRs (two generations), 0.0.0.0/0 if offline
        sets pN/rN, qN (timeout)      addresses of allowed names (two, for renewal), of denied names
        chain sN                      fixed rules: anti-spoofing, then allow > deny > blocked > offline > accept

A policy lives in set elements only, so changing it never touches a rule (see :func:`policy_change`).
Base chains use ``policy accept`` and only match branchbox's interfaces, so the host's other traffic and other
tables are untouched (a drop in another table still applies to sandboxes: nftables evaluates every table).
"""

from __future__ import annotations

from dataclasses import dataclass

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


# Per-sandbox sets (N = slot): a allow CIDRs; d/e deny CIDRs (two generations, see policy_change); p/r pinned
# addresses of allowed names (two, so a pin can be renewed by adding); q pinned addresses of denied names;
# o holds 0.0.0.0/0 while the sandbox has no internet access.
SETS = {"a": "interval", "d": "interval", "e": "interval", "o": "interval", "p": "timeout", "r": "timeout",
        "q": "timeout"}  # fmt: skip


def add_sandbox_script(table: str, prefix: str, slot: Slot, policy: NetworkPolicy) -> str:
    """The sandbox's sets, its chain (fixed rules: a policy lives in set elements only) and its map entry."""
    n = slot.index
    lines = [f"add set inet {table} {name}{n} {{ type ipv4_addr; flags {flags}; }}" for name, flags in SETS.items()]
    lines.append(f"add chain inet {table} s{n}")
    lines += [
        f"add rule inet {table} s{n} {rule}"
        for rule in (
            f"ip saddr != {slot.sandbox} drop",  # anti-spoofing (the sandbox keeps CAP_NET_RAW)
            "meta nfproto != ipv4 drop",
            f"ip daddr @p{n} accept",
            f"ip daddr @r{n} accept",
            f"ip daddr @a{n} accept",
            f"ip daddr @q{n} drop",
            f"ip daddr @d{n} drop",
            f"ip daddr @e{n} drop",
            "ip daddr @blocked4 drop",
            f"ip daddr @o{n} drop",
            "accept",
        )
    ]
    if policy.allow_out.cidrs:
        lines.append(f"add element inet {table} a{n} {{ {_elements(policy.allow_out.cidrs)} }}")
    if policy.deny_out.cidrs:
        lines.append(f"add element inet {table} d{n} {{ {_elements(policy.deny_out.cidrs)} }}")
    if not policy.internet:
        lines.append(f"add element inet {table} o{n} {{ 0.0.0.0/0 }}")
    lines.append(f'add element inet {table} egress {{ "{ifname(prefix, n)}" : jump s{n} }}')
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True)
class Op:
    kind: str  # "add" | "flush"
    set: str
    text: str


def policy_change(
    table: str, slot: Slot, old: NetworkPolicy, new: NetworkPolicy, *, deny_gen: int, pinned: bool, denied: bool
) -> tuple[list[str], int]:
    """Scripts (run in order) that turn ``old`` into ``new``, and the deny generation in use afterwards.

    Only element adds and set flushes: libnftables answers those without listing the whole ruleset (~0.03 ms
    with any number of sandboxes), while deleting elements or changing rules costs a full cache load
    (milliseconds per hundred sandboxes). Flushing a set and adding to it in one transaction costs the same, so
    such changes take two transactions, ordered so that the state between them is stricter than both policies:
    new deny CIDRs go into the unused deny generation and the old one is flushed after; old allow CIDRs (and
    pins) are flushed before the new ones are added; internet access is closed first and opened last. When no
    set is both flushed and added, the two merge into one atomic transaction (always the case on a claim)."""
    n = slot.index
    first: list[Op] = []
    second: list[Op] = []
    gen = deny_gen
    active, spare = ("d", "e") if deny_gen == 0 else ("e", "d")
    if new.deny_out.cidrs != old.deny_out.cidrs:
        if new.deny_out.cidrs:
            first.append(Op("add", spare, f"add element inet {table} {spare}{n} {{ {_elements(new.deny_out.cidrs)} }}"))
        if old.deny_out.cidrs:
            second.append(Op("flush", active, f"flush set inet {table} {active}{n}"))
        gen = 1 - deny_gen
    if new.allow_out.cidrs != old.allow_out.cidrs:
        if old.allow_out.cidrs:
            first.append(Op("flush", "a", f"flush set inet {table} a{n}"))
        if new.allow_out.cidrs:
            second.append(Op("add", "a", f"add element inet {table} a{n} {{ {_elements(new.allow_out.cidrs)} }}"))
    if pinned:  # names no longer allowed must not stay reachable; allowed ones are pinned at the next lookup
        first += [Op("flush", x, f"flush set inet {table} {x}{n}") for x in "pr"]
    if denied:
        second.append(Op("flush", "q", f"flush set inet {table} q{n}"))
    if old.internet and not new.internet:
        first.append(Op("add", "o", f"add element inet {table} o{n} {{ 0.0.0.0/0 }}"))
    elif new.internet and not old.internet:
        second.append(Op("flush", "o", f"flush set inet {table} o{n}"))
    ops = first + second
    flushed = {o.set for o in ops if o.kind == "flush"}
    added = {o.set for o in ops if o.kind == "add"}
    groups = [ops] if not flushed & added else [first, second]
    return ["\n".join(o.text for o in g) + "\n" for g in groups if g], gen


def remove_sandbox_script(table: str, prefix: str, slot: Slot) -> str:
    n = slot.index
    sets = "\n".join(f"delete set inet {table} {name}{n}" for name in SETS)
    return (
        f'delete element inet {table} egress {{ "{ifname(prefix, n)}" }}\n'
        f"flush chain inet {table} s{n}\ndelete chain inet {table} s{n}\n{sets}\n"
    )


def pin_script(table: str, slot: Slot, adds: dict[str, list[str]]) -> str:
    """Add addresses to pin sets (``{"p": [...], "r": [...], "q": [...]}``) for PIN_TIMEOUT_S: adds only.
    An element that exists keeps its timeout (re-adding does not renew it; see Network._pin)."""
    n = slot.index
    return "".join(
        f"add element inet {table} {name}{n} {{ {', '.join(f'{a} timeout {PIN_TIMEOUT_S}s' for a in addrs)} }}\n"
        for name, addrs in adds.items()
        if addrs
    )
