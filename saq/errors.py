"""SaqError for bad user input, and the number, integer, choice, seed and device checks that knobs and files share.

The entry points print a SaqError's message as one line, without a traceback.
"""

import inspect
import math


class SaqError(Exception):
    """A problem with the user's input (config, checkpoint, data) that they can fix; the message says how."""


def is_number(value) -> bool:
    """An int or float that is not a bool (JSON's true/false are no numbers, Python's bool is an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """A number (as is_number) that is finite; JSON integers too large for a float count as not finite."""
    if not is_number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range (a JSON file can hold a 400-digit one)
        return False


def is_int(value) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value, key: str, minimum: int | None = 1, allow_none: bool = False) -> int | None:
    """`value` when it is an integer (not a bool) >= minimum, or None where allowed; else a SaqError naming key."""
    if allow_none and value is None:
        return None
    if not is_int(value) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise SaqError(f"{key}={value!r} invalid; expected an integer{bound}" + (" or null" if allow_none else ""))
    return value


def check_choice(value, key: str, choices: tuple[str, ...]) -> str:
    """`value` when it is one of choices; else a SaqError naming key and listing them."""
    if value not in choices:
        raise SaqError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_bool(value, key: str) -> bool:
    """`value` when it is true or false; else a SaqError naming key ('no' or 'off' would be a truthy string)."""
    if not isinstance(value, bool):
        raise SaqError(f"{key}={value!r} invalid; expected true or false")
    return value


def check_number(value, key: str, minimum: float | None = None, maximum: float | None = None,
                 open_min: bool = False, open_max: bool = False) -> float:
    """`value` as a float when it is a finite number between minimum and maximum (None: unbounded on that side;
    open_min / open_max: that bound itself excluded); else a SaqError naming key."""
    ok = is_finite_number(value)
    if ok and minimum is not None:
        ok = value > minimum if open_min else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if open_max else value <= maximum
    if not ok:
        low = None if minimum is None else f"{'(' if open_min else '['}{minimum}"
        high = None if maximum is None else f"{maximum}{')' if open_max else ']'}"
        bound = (f" in {low}, {high}" if low and high
                 else f" {'>' if open_min else '>='} {minimum}" if low
                 else f" {'<' if open_max else '<='} {maximum}" if high else "")
        raise SaqError(f"{key}={value!r} invalid; expected a finite number{bound}")
    return float(value)


SEED_LIMIT = 2**32  # numpy's and Python's seeding take 0..2**32-1


def check_seed(value, key: str, allow_none: bool = False) -> int | None:
    """`value` when it is an integer seed 0..2**32-1 (or None where allowed); else a SaqError naming key."""
    check_int(value, key, 0, allow_none)
    if value is not None and value >= SEED_LIMIT:
        raise SaqError(f"{key}={value!r} invalid; expected an integer seed in 0..{SEED_LIMIT - 1}")
    return value


def check_device(value, key: str) -> str:
    """`value` when it names a device this machine has (cpu or cuda); else a SaqError naming key."""
    if value not in ("cpu", "cuda"):
        raise SaqError(f"{key}={value!r} is unknown; expected cpu or cuda")
    import torch  # only here: the rest of this module is imported by light tools

    if value == "cuda" and not torch.cuda.is_available():
        raise SaqError(f"{key}=cuda but no CUDA device is available; use {key}=cpu")
    return value


def check_settings_taken(cls: type, keys, key_prefix: str, label: str, also: tuple[str, ...] = ()) -> None:
    """SaqError naming the first of `keys` that cls's constructor does not take, and those it does (with `also`, the
    keys read elsewhere): a key added with + to a preset is said before construction, where Python's TypeError
    would name no key or call a bad value a bad key."""
    params = inspect.signature(cls).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    taken = [*also, *(name for name, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))]
    unknown = [key for key in keys if key not in taken]
    if unknown:
        raise SaqError(f"{key_prefix}.{unknown[0]} is not a setting of {label}; it takes "
                       f"{', '.join(taken) if taken else 'none'}")
