"""OS hardening of the trusted process, where the kernel allows it, with graceful fallbacks.

- PR_SET_DUMPABLE=0: no core dumps, and other same-user processes may not ptrace or read /proc/PID/mem.
- memfd_secret (Linux >= 5.14): pages removed from the kernel's direct map, so even the kernel
  cannot read them casually. They count against RLIMIT_MEMLOCK, so large buffers often fall back
  to ordinary memory; the report says how many bytes each holds now.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import weakref

import torch
from torch import Tensor

PR_SET_DUMPABLE = 4
SYS_MEMFD_SECRET = {"x86_64": 447, "aarch64": 447}.get(platform.machine())


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def make_undumpable() -> dict:
    if platform.system() != "Linux":
        return {"dumpable": True, "reason": f"prctl is Linux-only (this is {platform.system()})"}
    if _libc().prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        return {"dumpable": True, "reason": os.strerror(ctypes.get_errno())}
    return {"dumpable": False}


class SecretMemory:
    """Allocates tensors in memfd_secret mappings when possible, otherwise in ordinary memory.

    A tensor keeps its mapping alive (`torch.frombuffer` holds a reference to it), and the mapping is unmapped
    when the last tensor viewing it goes: a long-running enclave holds only what it still uses. The report
    counts the bytes held now, of each kind.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and SYS_MEMFD_SECRET is not None and platform.system() == "Linux"
        self.held = {"secret": 0, "ordinary": 0}
        self.fallback_reason: str | None = None if self.enabled else "memfd_secret unavailable on this platform"

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        nbytes = max(1, torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size())
        mapping = self._map(nbytes) if self.enabled else None
        kind = "secret" if mapping is not None else "ordinary"
        if mapping is None:
            mapping = mmap.mmap(-1, nbytes)  # anonymous: freed, and counted, the same way
        self.held[kind] += nbytes
        weakref.finalize(mapping, self._release, kind, nbytes)
        return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)

    def _release(self, kind: str, nbytes: int) -> None:
        self.held[kind] -= nbytes

    def copy(self, tensor: Tensor) -> Tensor:
        """A copy in secret memory. A transposed matrix stays transposed: that layout is what `field.product_weight`
        chose for the product to read fastest."""
        if tensor.dim() == 2 and not tensor.is_contiguous() and tensor.t().is_contiguous():
            return self.copy(tensor.t()).t()
        return self.empty(tuple(tensor.shape), tensor.dtype).copy_(tensor)

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        return self.empty(shape, dtype).zero_()

    def _map(self, nbytes: int) -> mmap.mmap | None:
        libc = _libc()
        fd = libc.syscall(SYS_MEMFD_SECRET, 0)
        if fd < 0:
            self.fallback_reason = f"memfd_secret: {os.strerror(ctypes.get_errno())}"
            self.enabled = False  # the kernel lacks it: stop asking
            return None
        try:
            os.ftruncate(fd, nbytes)
            mapping = mmap.mmap(fd, nbytes)
        except OSError as exc:  # typically ENOMEM/EAGAIN past RLIMIT_MEMLOCK
            self.fallback_reason = f"memfd_secret: {exc.strerror}"
            return None
        finally:
            os.close(fd)
        return mapping

    def report(self) -> dict:
        return {
            "secret_bytes": self.held["secret"],
            "ordinary_bytes": self.held["ordinary"],
            "fallback_reason": self.fallback_reason,
        }
