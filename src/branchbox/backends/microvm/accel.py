"""Choosing the accelerator: KVM when a standard guest really boots on it, else TCG.

``/dev/kvm`` is not enough: nested hosts may offer a paravirtual KVM (kvm-pvm) on which stock kernels die with
emulation failures. So a short probe boot (the real kernel and initrd with ``bb.probe``: the init prints a marker
and powers off) decides, once per host: the verdict is cached in ``<cache>/accel.json`` keyed by host kernel,
QEMU binary and CPU flags. ``BRANCHBOX_VM_ACCEL=kvm|tcg`` overrides the probe.

Under TCG the guest gets ``tsc_early_khz=<host TSC kHz> tsc=reliable``: TCG boots otherwise hang 10-20% of the time
calibrating the TSC. It also gets ``norandmaps`` (no address space randomisation) unless ``keeps_aslr``: QEMU 7.2's
TCG keys translated code by guest *virtual* address, so with randomised mmap bases every new process translates
ld.so and libc again (spawning ``/bin/true`` in the guest: ~30 ms with ASLR, ~5 ms without). QEMU 10 shares
translations across virtual addresses (measured: ASLR costs it little), so there the guest keeps ASLR.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from branchbox.backends.microvm.image import GuestImages
from branchbox.backends.microvm.qemu import QEMU, SECCOMP

log = logging.getLogger("branchbox.microvm")
PROBE_MARKER = "branchbox-probe-ok"
PROBE_TIMEOUT = 20.0


@dataclass(frozen=True, slots=True)
class Accel:
    name: str  # "kvm" | "tcg"
    reason: str


def host_tsc_khz() -> int:
    """The host's TSC frequency in kHz (TCG's guest TSC runs at the host's rate)."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    return 2_000_000


ASLR_CHEAP_FROM = (10, 0)  # the first QEMU measured to keep TCG translations across randomised mappings


def keeps_aslr(setting: bool | None, qemu_version: tuple[int, int]) -> bool:
    """Whether a TCG guest keeps ASLR: as set (``BRANCHBOX_VM_TCG_ASLR``), else only where it is cheap."""
    return setting if setting is not None else qemu_version >= ASLR_CHEAP_FROM


def guest_cmdline(accel: str, extra: str = "", *, tcg_aslr: bool = False) -> str:
    base = "console=ttyS0 quiet loglevel=1 panic=-1 pci=off nomodeset init_on_free=0 8250.nr_uarts=1"
    if accel == "tcg":
        base += f" tsc_early_khz={host_tsc_khz()} tsc=reliable"
        if not tcg_aslr:
            base += " norandmaps"
    return f"{base} {extra}".strip()


def _host_key() -> str:
    flags = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = line
                break
    qemu = shutil.which(QEMU) or QEMU
    st = os.stat(qemu) if os.path.exists(qemu) else None
    raw = f"{os.uname().release}|{qemu}|{st.st_mtime_ns if st else 0}|{flags}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _kvm_usable() -> str | None:
    """None when /dev/kvm can be opened, else why not."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm: {exc.strerror}"
    os.close(fd)
    return None


def probe_argv(guest: GuestImages, console: Path) -> list[str]:
    """The probe's QEMU: branchbox's own kernel and initrd, no disk, no network, no device a sandbox controls,
    at most ``PROBE_TIMEOUT`` s once per host. It is the one QEMU not started through the jail (it runs before
    the backend has one, and parses nothing a sandbox wrote); it still loads the same seccomp filter."""
    return [QEMU, "-M", "microvm,x-option-roms=off,rtc=on", "-accel", "kvm", "-cpu", "host", "-m", "128M",
            "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
            "-append", guest_cmdline("kvm", "bb.probe"), "-nodefaults", "-no-user-config", "-nographic",
            "-no-reboot", "-serial", f"file:{console}", "-sandbox", SECCOMP]  # fmt: skip


async def _probe_kvm(guest: GuestImages) -> Accel:
    with tempfile.TemporaryDirectory(prefix="branchbox-kvm-probe-") as tmp:
        console = Path(tmp) / "console.log"
        argv = probe_argv(guest, console)
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return Accel("tcg", f"a probe boot on KVM did not finish within {PROBE_TIMEOUT:.0f} s")
        out = console.read_text(errors="replace") if console.exists() else ""
        if PROBE_MARKER in out:
            return Accel("kvm", "a probe boot on KVM reached the guest's init")
        why = (err.decode(errors="replace").strip().splitlines() or out.strip().splitlines() or ["no output"])[-1]
        return Accel("tcg", f"a probe boot on KVM failed: {why[:300]}")


async def choose(cache: Path, guest: GuestImages) -> Accel:
    forced = os.environ.get("BRANCHBOX_VM_ACCEL")
    if forced in ("kvm", "tcg"):
        return Accel(forced, "BRANCHBOX_VM_ACCEL")
    why = _kvm_usable()
    if why is not None:
        acc = Accel("tcg", why)
    else:
        path = cache / "accel.json"
        key = _host_key()
        with contextlib.suppress(OSError, ValueError, KeyError):
            saved = json.loads(path.read_text())
            if saved["key"] == key:
                return Accel(saved["accel"], saved["reason"] + " (cached)")
        acc = await _probe_kvm(guest)
        tmp = path.with_name(f".accel.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "accel": acc.name, "reason": acc.reason}))
        tmp.rename(path)
    if acc.name == "tcg":
        log.warning("microVMs run under TCG (software emulation, slow): %s", acc.reason)
    return acc
