"""The untrusted worker: holds device tensors, runs outsourced ops, records its view.

Nothing here imports the enclave: the device only ever has what the enclave chose to send.
"""

from .endpoint import DeviceEndpoint, DeviceUnavailable
from .recorder import HeldState, ViewRecorder

__all__ = ["DeviceEndpoint", "DeviceUnavailable", "HeldState", "ViewRecorder"]
