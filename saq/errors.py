"""The error type for bad user input: the entry point prints its message as one line, without a traceback."""


class SaqError(Exception):
    """A problem with the user's input (config, checkpoint, data) that they can fix; the message says how."""
