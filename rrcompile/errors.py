"""Typed exceptions. Every message is one line that names the culprit (file, node, tensor)."""


class RRCompileError(Exception):
    """Base of every error rrcompile reports to a user; the CLI turns it into exit code 2."""


class ModelLoadError(RRCompileError):
    """The model file is missing, truncated or not a valid ONNX model."""


class UnsupportedModelError(RRCompileError):
    """The model is valid ONNX but rrcompile cannot handle it (e.g. no analog layer)."""


class PassError(RRCompileError):
    """A pass failed or broke an invariant; the message names the pass."""


class DeviceSpecError(RRCompileError):
    """A device specification (CLI string or device file) is malformed or out of range."""


class DataError(RRCompileError):
    """A data spec cannot be loaded or does not fit the model's input."""


class OptionError(RRCompileError):
    """A command-line option has a value outside its range."""


class OutputPathError(RRCompileError):
    """An output path cannot be written, or would overwrite an input or another output."""
