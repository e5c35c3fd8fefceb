"""One exception hierarchy: every failure a user can cause is a QatoolError with a message that says what to do."""


class QatoolError(Exception):
    """Base of every user-facing error. The CLI prints `qatool: error: <message>` and exits with `exit_code`."""

    exit_code = 1


class UsageError(QatoolError):
    """Bad flags or option values (exit code 2, like click's own usage errors)."""

    exit_code = 2


class ModelError(QatoolError):
    """The model file is missing, not ONNX, invalid, or uses something qatool cannot handle."""


class UnsupportedOpError(ModelError):
    """A node whose op_type has no implementation in the engine."""

    def __init__(self, op_type: str, node_name: str, supported: list[str]):
        self.op_type = op_type
        self.node_name = node_name
        super().__init__(
            f"op {op_type!r} (node {node_name!r}) is not supported by the engine; "
            f"supported ops: {', '.join(sorted(supported))}"
        )


class DataError(QatoolError):
    """The data folder or list file is missing, empty, or inconsistent with the model."""


class ConfigError(QatoolError):
    """A configuration file or value that fails validation."""


class DivergedError(QatoolError):
    """Training produced non-finite values (NaN or inf)."""
