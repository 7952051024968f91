"""The microVM backend (QEMU ``microvm``): see docs/microvm.md."""

from branchbox.backends.microvm.backend import MicroVMBackend, MicroVMConfig

__all__ = ["MicroVMBackend", "MicroVMConfig"]
