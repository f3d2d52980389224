"""The error type for bad user input (the entry point prints its message as one line, without a traceback), and the
integer check most knobs share."""


class SaqError(Exception):
    """A problem with the user's input (config, checkpoint, data) that they can fix; the message says how."""


def check_int(value, key: str, minimum: int | None = 1, allow_none: bool = False) -> int | None:
    """`value` when it is an integer (not a bool) >= minimum, or None where allowed; else a SaqError naming key."""
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise SaqError(f"{key}={value!r} invalid; expected an integer{bound}" + (" or null" if allow_none else ""))
    return value
