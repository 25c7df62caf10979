"""The one error type a stage reports to its user as a single line."""


class PipelineError(Exception):
    """Bad input or params: the message names the file, row or parameter at fault."""
