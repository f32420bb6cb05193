"""The trusted side: the runtime that holds secrets and runs enclave ops, its memory accounting and hardening."""

from .memory import EnclaveMemory
from .runtime import EnclaveRuntime

__all__ = ["EnclaveMemory", "EnclaveRuntime"]
