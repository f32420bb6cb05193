"""secureinfer: LLaMA inference split between a trusted enclave and an untrusted accelerator.

The public names load lazily (PEP 562), so that the device process, which imports
`secureinfer.device`, never loads the enclave's code.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load": "api",
    "SecureLM": "api",
    "GenerationConfig": "engine",
    "GenerationResult": "engine",
    "SecureInferError": "errors",
    "ModelLoadError": "errors",
    "InvalidRequestError": "errors",
    "IntegrityError": "errors",
    "AdapterLoadError": "model.adapter",
    "DeviceError": "channel.base",
    "DeviceDied": "channel.base",
    "DeviceTimeout": "channel.base",
    "DeviceProtocolError": "channel.base",
    "DeviceFailed": "channel.base",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'secureinfer' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
