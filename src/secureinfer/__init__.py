"""secureinfer: LLaMA inference split between a trusted enclave and an untrusted accelerator."""

from .api import SCHEMES, SecureLM, load
from .engine import GenerationConfig, GenerationResult
from .errors import InvalidRequestError, ModelLoadError, SecureInferError

__version__ = "0.1.0"
__all__ = [
    "SCHEMES",
    "GenerationConfig",
    "GenerationResult",
    "InvalidRequestError",
    "ModelLoadError",
    "SecureInferError",
    "SecureLM",
    "load",
]
