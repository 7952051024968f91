"""The nftables rules, as scripts (pure functions; :class:`~branchbox.net.nftables.Nft` runs them).

One table per daemon (family ``inet``, name from the settings) holds everything; removing it removes all::

    table inet branchbox
      set blocked4                          the ranges of policy.BLOCKED_V4
      set owned    ifname . addr            each sandbox's host veth and its address (anti-spoofing)
      set offline  addr                     sandboxes without internet access
      set allow    addr . addr-range        allow_out CIDRs      set deny   addr . addr-range  deny_out CIDRs
      set pins, pins2  addr . addr (timeout)  addresses of allowed names (two, for renewal)
      set dpins        addr . addr (timeout)  addresses of denied names
      chain prerouting  (nat)       DNS (udp/tcp 53) from any sandbox -> the host's forwarder
      chain postrouting (nat)       masquerade sandbox traffic leaving by any other interface
      chain input   (filter)        sandbox -> host: replies to the host's own connections and DNS only;
                                    the forwarder's port is closed to new flows from other hosts (not to
                                    loopback, never to replies: see below)
      chain forward (filter)        into a sandbox: replies only; out of a sandbox: chain egress
      chain egress                  anti-spoofing, then allow > deny > blocked > offline > accept (policy.py)

A sandbox's rule set is its elements in these sets, keyed by its address: added when it is attached, replaced
when its policy changes, removed with it. The rules never change. This is what keeps a claim cheap with any
number of sandboxes: libnftables reloads its cache of the table before each command, and with shared sets that
cache stays a few objects, where per-sandbox sets and chains made it grow with every sandbox (an element added to
one of 1400 per-sandbox interval sets cost ~24 ms; here ~0.05-0.3 ms).

Base chains use ``policy accept`` and only match branchbox's interfaces, so the host's other traffic and other
tables are untouched (a drop in another table still applies to sandboxes: nftables evaluates every table).
The one rule that matches outside them, closing the forwarder's port, drops only *new* flows arriving on an
interface other than ``lo``: a table outlives a daemon killed with SIGKILL (its sandboxes keep their network), and
its forwarder's port is then free for the kernel to hand out again, as the source port of a host process's
connection (whose replies, a RST from a closed port say, were dropped: ``connect`` hung instead of failing) or
to a service on loopback. The forwarder ignores queries whose source is not a sandbox's address anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from branchbox.net.policy import BLOCKED_V4, NetworkPolicy

PIN_TIMEOUT_S = 3600  # a resolved address of an allowed name stays allowed this long (renewed, see Network._pin)
PIN_SETS = ("pins", "pins2", "dpins")


def ifname(prefix: str, slot: int) -> str:
    return f"{prefix}{slot:x}"


def table_script(table: str, prefix: str, subnet: str, dns_port: int) -> str:
    """(Re)create the daemon's table, empty of sandboxes."""
    wild = f'"{prefix}*"'
    pair = "type ipv4_addr . ipv4_addr"
    return f"""add table inet {table}
delete table inet {table}
table inet {table} {{
  set blocked4 {{
    type ipv4_addr
    flags interval
    elements = {{ {", ".join(BLOCKED_V4)} }}
  }}
  set owned {{ type ifname . ipv4_addr; }}
  set offline {{ type ipv4_addr; }}
  set allow {{ {pair}; flags interval; }}
  set deny {{ {pair}; flags interval; }}
  set pins {{ {pair}; flags timeout; }}
  set pins2 {{ {pair}; flags timeout; }}
  set dpins {{ {pair}; flags timeout; }}
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
    iifname != "lo" ct state new meta l4proto {{ tcp, udp }} th dport {dns_port} drop
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
    iifname {wild} jump egress
  }}
  chain egress {{
    meta nfproto != ipv4 drop
    iifname . ip saddr != @owned drop
    ip saddr . ip daddr @pins accept
    ip saddr . ip daddr @pins2 accept
    ip saddr . ip daddr @allow accept
    ip saddr . ip daddr @dpins drop
    ip saddr . ip daddr @deny drop
    ip daddr @blocked4 drop
    ip saddr @offline drop
    accept
  }}
}}
"""


def delete_table_script(table: str) -> str:
    return f"add table inet {table}\ndelete table inet {table}\n"


def _pairs(addr: str, cidrs: Iterable[str]) -> str:
    return ", ".join(f"{addr} . {c}" for c in cidrs)


def _policy_elements(table: str, addr: str, policy: NetworkPolicy, verb: str) -> list[str]:
    lines = []
    if policy.allow_out.cidrs:
        lines.append(f"{verb} element inet {table} allow {{ {_pairs(addr, policy.allow_out.cidrs)} }}")
    if policy.deny_out.cidrs:
        lines.append(f"{verb} element inet {table} deny {{ {_pairs(addr, policy.deny_out.cidrs)} }}")
    if not policy.internet:
        lines.append(f"{verb} element inet {table} offline {{ {addr} }}")
    return lines


def _drop_pins(table: str, addr: str, pins: Mapping[str, Iterable[str]]) -> list[str]:
    """Remove pinned elements that may have expired meanwhile: add (a no-op when present) then delete, so a
    missing element cannot fail the transaction."""
    lines = []
    for name, targets in pins.items():
        pairs = _pairs(addr, targets)
        if pairs:
            lines.append(f"add element inet {table} {name} {{ {pairs} }}")
            lines.append(f"delete element inet {table} {name} {{ {pairs} }}")
    return lines


def add_sandbox_script(table: str, host_if: str, addr: str, policy: NetworkPolicy) -> str:
    lines = [f'add element inet {table} owned {{ "{host_if}" . {addr} }}']
    return "\n".join(lines + _policy_elements(table, addr, policy, "add")) + "\n"


def policy_change(
    table: str, addr: str, old: NetworkPolicy, new: NetworkPolicy, pins: Mapping[str, Iterable[str]]
) -> str:
    """One atomic transaction turning ``old`` into ``new`` (empty when nothing changes). From the pooled default
    it only adds elements (a claim: ~0.05-0.3 ms); removals load the elements of the sets they touch."""
    lines: list[str] = []
    for name, o, n in (("allow", old.allow_out.cidrs, new.allow_out.cidrs), ("deny", old.deny_out.cidrs,
                                                                            new.deny_out.cidrs)):  # fmt: skip
        gone = [c for c in o if c not in n]
        come = [c for c in n if c not in o]
        if gone:
            lines.append(f"delete element inet {table} {name} {{ {_pairs(addr, gone)} }}")
        if come:
            lines.append(f"add element inet {table} {name} {{ {_pairs(addr, come)} }}")
    if old.internet and not new.internet:
        lines.append(f"add element inet {table} offline {{ {addr} }}")
    elif new.internet and not old.internet:
        lines.append(f"delete element inet {table} offline {{ {addr} }}")
    if old != new:  # names no longer allowed must not stay reachable; allowed ones are pinned again
        lines += _drop_pins(table, addr, pins)
    return "\n".join(lines) + "\n" if lines else ""


def remove_sandbox_script(
    table: str, host_if: str, addr: str, policy: NetworkPolicy, pins: Mapping[str, Iterable[str]]
) -> str:
    """Delete everything of the sandbox; every element is added first (a no-op when present), so an element
    already gone cannot fail the transaction and leave the others behind."""
    owned = f'owned {{ "{host_if}" . {addr} }}'
    lines = [f"add element inet {table} {owned}", f"delete element inet {table} {owned}"]
    for add, delete in zip(
        _policy_elements(table, addr, policy, "add"), _policy_elements(table, addr, policy, "delete"), strict=True
    ):
        lines += [add, delete]
    return "\n".join(lines + _drop_pins(table, addr, pins)) + "\n"


def pin_script(table: str, addr: str, adds: dict[str, list[str]]) -> str:
    """Add pinned addresses (``{"pins": [...], "pins2": [...], "dpins": [...]}``) for PIN_TIMEOUT_S: adds only.
    An element that exists keeps its timeout (re-adding does not renew it; see Network._pin)."""
    return "".join(
        f"add element inet {table} {name} {{ "
        + ", ".join(f"{addr} . {a} timeout {PIN_TIMEOUT_S}s" for a in targets)
        + " }\n"
        for name, targets in adds.items()
        if targets
    )
