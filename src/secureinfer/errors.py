"""User-facing errors: each names the problem and the fix, so the CLI can print one line."""


class SecureInferError(Exception):
    """Base for every error a user can cause and fix. `fix` is an imperative hint."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}; {fix}")
        self.problem = problem
        self.fix = fix


class ModelLoadError(SecureInferError):
    """The model path is missing, not a supported format, corrupt, or of an unsupported architecture."""


class InvalidRequestError(SecureInferError):
    """A prompt, message list or generation option the model cannot serve."""


class IntegrityError(SecureInferError):
    """A device result failed its integrity check (or sealed data failed authentication): nothing was emitted."""
