"""Host claims: the names and ranges each daemon on a host owns, so that neighbouring daemons never touch each
other's sandboxes (issue 21.2).

A daemon owns a cgroup parent, an nftables table, a veth name prefix, a subnet and a block of host uid ranges (one
range per sandbox, issue 22.1; its runtime dirs are inside its data dir). Names not configured are derived from the
data dir (:func:`derive`); a subnet not configured is allocated, free of every other claim and of the host's routes.
What a daemon resolved is persisted in ``DATA/host.json``, so a restart keeps it, and registered host-wide in
``claims.json`` under an flock (``/var/lib/branchbox-host``; ``BRANCHBOX_CLAIMS_DIR`` moves it), persistent so that
a reboot cannot hand a stopped daemon's subnet to another one.

Liveness: a daemon holds an flock on ``DATA/daemon.lock`` for as long as it runs (the kernel drops it when the
process dies, so a crash releases it); it is taken and probed only under the registry's lock, so probing never
races a start. A daemon that is not running keeps its claim while its data dir exists (its sandboxes may still
run and will be re-attached): only deleting the data dir frees the names. Two daemons on one data dir: the second
refuses. A setting that collides with another daemon's claim is refused with the other's data dir and pid, and
the setting to change.

The data dir ``/var/lib/branchbox`` (the default, ``make run``) keeps the names every daemon had before claims
existed (cgroup ``branchbox``, table ``branchbox``, prefix ``bbn``, subnet 10.200.0.0/16), so an upgraded daemon
re-attaches the sandboxes that kept running across the upgrade.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import ipaddress
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from branchbox.backends.idranges import CANONICAL_BASE, RANGE_SIZE
from branchbox.backends.microvm.jail import UID_BASE as VM_UID_BASE
from branchbox.backends.microvm.jail import UID_COUNT as VM_UID_COUNT
from branchbox.core.settings import DEFAULT_DATA_DIR, ManagerSettings
from branchbox.errors import ConflictError
from branchbox.net.settings import NetworkSettings

CLAIMS_DIR = Path("/var/lib/branchbox-host")
# the names every daemon had before claims, kept by the default data dir: the core's defaults
LEGACY_DATA_DIR = DEFAULT_DATA_DIR
LEGACY_CGROUP_PARENT = str(next(f.default for f in fields(ManagerSettings) if f.name == "cgroup_parent"))
LEGACY_SUBNET = str(next(f.default for f in fields(NetworkSettings) if f.name == "subnet"))
NAMES_FILE = "host.json"
LOCK_FILE = "daemon.lock"
# allocated subnets: /19s (2048 sandboxes each, 256 of them) in 10.224.0.0/11, away from the legacy 10.200.0.0/16
ALLOC_POOL = ipaddress.IPv4Network("10.224.0.0/11")
ALLOC_PREFIX = 19
VM_SUFFIX = "-vm"  # the microVM backend's cgroups are under <cgroup_parent>-vm (backends/microvm/config.py)
# uid blocks (per-sandbox ranges) are allocated in [UID_POOL_START, UID_POOL_END), aligned to their size, away from
# the canonical range (templates on disk, 100000) and the microVM jail's uids
UID_POOL_START = 1 << 26
UID_POOL_END = (1 << 32) - (1 << 24)  # below uid -1 and the ids some tools treat as special near the top
_SALTS = 16  # derived names that collide with another claim are derived again with a salt, this many times


class ClaimError(ConflictError):
    """Another daemon owns this data dir or one of the names or ranges this daemon would use."""


@dataclass(frozen=True, slots=True)
class HostNames:
    """What one daemon owns on the host (network fields None when its networking is off)."""

    cgroup_parent: str
    table: str | None = None
    if_prefix: str | None = None
    subnet: str | None = None
    uid_first: int | None = None  # the block of per-sandbox uid ranges: first host uid ...
    uid_ranges: int | None = None  # ... and number of ranges of RANGE_SIZE ids (None: ranges off)

    def uid_block(self) -> tuple[int, int] | None:
        """[start, end) host uids of the block, if any."""
        if self.uid_first is None or not self.uid_ranges:
            return None
        return self.uid_first, self.uid_first + self.uid_ranges * RANGE_SIZE

    def clashes(self, other: HostNames) -> list[str]:
        """The settings (config names) in which ``self`` and ``other`` collide."""
        out = []
        mine, theirs = self.cgroup_parent, other.cgroup_parent
        if mine == theirs or VM_SUFFIX in (mine.removeprefix(theirs), theirs.removeprefix(mine)):
            out.append(f"cgroup_parent ({mine}; a daemon's microVMs use {mine}{VM_SUFFIX})")
        if self.table is not None and self.table == other.table:
            out.append(f"network_table ({self.table})")
        if self.if_prefix is not None and self.if_prefix == other.if_prefix:
            out.append(f"network_if_prefix ({self.if_prefix})")
        if self.subnet is not None and other.subnet is not None and _overlap(self.subnet, other.subnet):
            out.append(f"network_subnet ({self.subnet} overlaps {other.subnet})")
        a, b = self.uid_block(), other.uid_block()
        if a is not None and b is not None and a[0] < b[1] and b[0] < a[1]:
            out.append(f"uid_first (host uids {a[0]}-{a[1] - 1} overlap {b[0]}-{b[1] - 1})")
        return out


@dataclass(frozen=True, slots=True)
class Wanted:
    """The daemon's configuration of its names: None is 'not configured' (persisted, else derived)."""

    network: bool
    cgroup_parent: str | None = None
    table: str | None = None
    if_prefix: str | None = None
    subnet: str | None = None
    uid_first: int | None = None
    uid_ranges: int = 0  # 0: no per-sandbox ranges (every sandbox in the canonical range, as before issue 22.1)


def network_names(cgroup_parent: str) -> tuple[str, str]:
    """nftables table and veth prefix that go with a cgroup parent: ``branchbox``/``bbn`` for the legacy one,
    else names derived from it (veths are ``<prefix>-<slot>``, so no prefix matches another's names)."""
    if cgroup_parent == LEGACY_CGROUP_PARENT:
        return "branchbox", "bbn"
    digest = hashlib.sha256(cgroup_parent.encode()).hexdigest()
    return f"branchbox_{digest[:8]}", f"b{digest[:5]}"


def derive(data_dir: Path, salt: int = 0) -> str:
    """The cgroup parent of a data dir (by its real path): ``branchbox-<8 hex>``; the legacy name for
    /var/lib/branchbox."""
    real = os.path.realpath(data_dir)
    if real == os.path.realpath(LEGACY_DATA_DIR) and salt == 0:
        return LEGACY_CGROUP_PARENT
    key = real if salt == 0 else f"{real}#{salt}"
    return "branchbox-" + hashlib.sha256(key.encode()).hexdigest()[:8]


@dataclass(slots=True)
class Claim:
    """A daemon's claim: its names and the flock on its data dir, held until :meth:`release` (or exit)."""

    data_dir: Path
    names: HostNames
    lock_fd: int

    def release(self) -> None:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # the flock goes with the last fd; the claim itself stays registered
            self.lock_fd = -1


def claims_dir() -> Path:
    return Path(os.environ.get("BRANCHBOX_CLAIMS_DIR") or CLAIMS_DIR)


def claim(data_dir: Path, wanted: Wanted) -> Claim:
    """Take this data dir and the names ``wanted`` resolves to, or raise :class:`ClaimError`."""
    data_dir.mkdir(parents=True, exist_ok=True)
    real = os.path.realpath(data_dir)
    with _registry() as reg:
        fd = _lock_data_dir(data_dir)
        try:
            others = {d: e for d, e in reg.items() if d != real and os.path.isdir(d)}
            names = _resolve(data_dir, wanted, others)
            reg.clear()
            reg.update(others)
            reg[real] = {"pid": os.getpid(), "names": asdict(names), "at": time.time()}
            _write_json(data_dir / NAMES_FILE, asdict(names))
        except BaseException:
            os.close(fd)
            raise
    return Claim(data_dir, names, fd)


def _lock_data_dir(data_dir: Path) -> int:
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise ClaimError(
            f"another daemon (pid {holder}) already serves the data dir {data_dir}: stop it, or give this one "
            "its own --data-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _running(data_dir: str) -> bool:
    """Whether a daemon holds the lock of ``data_dir`` (probed under the registry lock only)."""
    try:
        fd = os.open(os.path.join(data_dir, LOCK_FILE), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops the probe's lock
    return False


def _resolve(data_dir: Path, wanted: Wanted, others: dict[str, dict[str, Any]]) -> HostNames:
    saved = _read_names(data_dir)
    known = {f.name for f in fields(HostNames)}  # a newer daemon's entry may have more: not ours to read
    taken = {
        d: HostNames(**{k: v for k, v in e["names"].items() if k in known})
        for d, e in others.items()
        if isinstance(e.get("names"), dict)
    }
    for salt in range(_SALTS):
        parent = wanted.cgroup_parent or (saved.cgroup_parent if saved else None) or derive(data_dir, salt)
        names = HostNames(cgroup_parent=parent)
        if wanted.network:
            table, prefix = network_names(parent)
            if saved is not None and saved.cgroup_parent == parent:  # keep what this daemon had
                table, prefix = saved.table or table, saved.if_prefix or prefix
            names = replace(
                names,
                table=wanted.table or table,
                if_prefix=wanted.if_prefix or prefix,
                subnet=wanted.subnet or (saved.subnet if saved else None) or _default_subnet(data_dir, taken),
            )
        if wanted.uid_ranges:
            keep = saved is not None and saved.uid_ranges == wanted.uid_ranges and salt == 0
            first = wanted.uid_first or (saved.uid_first if keep and saved is not None else None)
            if first is None:
                first = allocate_uid_block(wanted.uid_ranges, [t.uid_block() for t in taken.values()], data_dir)
            names = replace(names, uid_first=first, uid_ranges=wanted.uid_ranges)
        clashes = {d: names.clashes(t) for d, t in taken.items()}
        clashes = {d: c for d, c in clashes.items() if c}
        if not clashes:
            return names
        derived_parent = wanted.cgroup_parent is None and (saved is None or salt > 0)
        if derived_parent and all(_only_derived(c, wanted) for c in clashes.values()):
            saved = None  # derive everything again, salted
            continue
        d, c = next(iter(clashes.items()))
        pid = others[d].get("pid", "?")
        state = f"running, pid {pid}" if _running(d) else f"not running (last pid {pid}); its sandboxes may still run"
        raise ClaimError(
            f"this daemon's {', '.join(c)} collide(s) with the daemon of data dir {d} ({state}): configure "
            f"different values for this daemon (config file or BRANCHBOX_{c[0].split(' ')[0].upper()}), or "
            f"remove that data dir if it is no longer used"
        )
    raise ClaimError(f"no free names for data dir {data_dir} after {_SALTS} tries: configure cgroup_parent")


def _only_derived(clashes: list[str], wanted: Wanted) -> bool:
    configured = {
        "cgroup_parent": wanted.cgroup_parent,
        "network_table": wanted.table,
        "network_if_prefix": wanted.if_prefix,
        "network_subnet": wanted.subnet,
        "uid_first": wanted.uid_first,
    }
    return all(configured[c.split(" ")[0]] is None for c in clashes)


def _default_subnet(data_dir: Path, taken: dict[str, HostNames]) -> str:
    if os.path.realpath(data_dir) == os.path.realpath(LEGACY_DATA_DIR):
        return LEGACY_SUBNET
    return allocate_subnet([t.subnet for t in taken.values() if t.subnet], host_routes(), data_dir)


def allocate_subnet(claimed: list[str], routes: list[ipaddress.IPv4Network], data_dir: Path) -> str:
    """A /19 of 10.224.0.0/11 that overlaps no claimed subnet and no host route; the search starts at a block
    derived from the data dir, so a data dir tends to get the same block again."""
    blocks = list(ALLOC_POOL.subnets(new_prefix=ALLOC_PREFIX))
    start = int(hashlib.sha256(os.path.realpath(data_dir).encode()).hexdigest(), 16) % len(blocks)
    used = [ipaddress.IPv4Network(c) for c in claimed] + routes
    for i in range(len(blocks)):
        block = blocks[(start + i) % len(blocks)]
        if not any(block.overlaps(u) for u in used):
            return str(block)
    raise ClaimError(f"no free /{ALLOC_PREFIX} left in {ALLOC_POOL} for sandbox networks: configure network_subnet")


def allocate_uid_block(ranges: int, claimed: list[tuple[int, int] | None], data_dir: Path) -> int:
    """The first host uid of a free block of ``ranges`` ranges: aligned to its size, inside the uid pool, clear
    of every claimed block, of the canonical range and of the microVM jail's uids; the search starts at a block
    derived from the data dir."""
    size = ranges * RANGE_SIZE
    lo = -(-UID_POOL_START // size) * size
    starts = list(range(lo, UID_POOL_END - size + 1, size))
    if not starts:
        raise ClaimError(f"uid_ranges = {ranges} is too large for the host's uid space: configure fewer")
    reserved = [(CANONICAL_BASE, CANONICAL_BASE + RANGE_SIZE), (VM_UID_BASE, VM_UID_BASE + VM_UID_COUNT)]
    used = [c for c in claimed if c is not None] + reserved
    first = int(hashlib.sha256(os.path.realpath(data_dir).encode()).hexdigest(), 16) % len(starts)
    for i in range(len(starts)):
        start = starts[(first + i) % len(starts)]
        if not any(start < end and begin < start + size for begin, end in used):
            return start
    raise ClaimError(
        f"no free block of {ranges} uid ranges left on this host (other daemons' data dirs hold them): configure "
        "uid_ranges smaller, or remove data dirs no longer used"
    )


def host_routes() -> list[ipaddress.IPv4Network]:
    """IPv4 routes of the host's main table (connected routes of its addresses included), default routes left
    out."""
    out: list[ipaddress.IPv4Network] = []
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return out
    for line in lines:
        f = line.split()
        if len(f) < 8:
            continue
        dest = ipaddress.IPv4Address(int(f[1], 16).to_bytes(4, "little"))
        mask = bin(int(f[7], 16)).count("1")
        if mask:
            out.append(ipaddress.IPv4Network(f"{dest}/{mask}", strict=False))
    return out


def _overlap(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_network(a).overlaps(ipaddress.ip_network(b))
    except ValueError:
        return False


def _read_names(data_dir: Path) -> HostNames | None:
    try:
        raw = json.loads((data_dir / NAMES_FILE).read_text())
        return HostNames(**raw)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        raise ClaimError(f"{data_dir / NAMES_FILE} is unreadable ({exc}): fix or remove it") from exc


@contextlib.contextmanager
def _registry() -> Iterator[dict[str, dict[str, Any]]]:
    """The host's claims (data dir real path -> entry), locked; written back when the block succeeds."""
    root = claims_dir()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(root / "claims.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = root / "claims.json"
        try:
            reg = json.loads(path.read_text())
        except FileNotFoundError:
            reg = {}
        except ValueError:
            reg = {}  # a torn file cannot happen (atomic replace); a hand-edited one is rebuilt from live daemons
        if not isinstance(reg, dict):
            reg = {}
        yield reg
        _write_json(path, reg)
    finally:
        os.close(fd)


def _write_json(path: Path, doc: object) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
