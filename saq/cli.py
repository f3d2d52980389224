"""Arguments of saq's small tools (`python -m saq.report PATH out=DIR`): one path, then key=value options."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from saq.errors import SaqError


def tool_args(argv: Sequence[str], usage: str, options: dict[str, tuple[str, ...] | None],
              about: str | None = None) -> tuple[str, dict]:
    """(the positional path, {option: value}) from `PATH key=value ...`; options maps each key to its allowed
    values (None: any). A missing path, an unknown key or a value outside the allowed ones is a SaqError.
    -h/--help prints the usage and `about` (the tool's docstring) and exits 0."""
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: {usage}")
        if about:
            print(f"\n{about.strip()}")
        raise SystemExit(0)
    flags = [a for a in argv if a.startswith("-") and "=" not in a]
    if flags:
        raise SaqError(f"unknown flag {flags[0]!r} (options are key=value); usage: {usage}")

    def is_option(arg: str) -> bool:  # a sweep job's folder (.../clip=mse,quant=w4a4) is a path, not an option
        if not ("=" in arg and arg.split("=", 1)[0].isidentifier()):
            return False
        try:
            return not Path(arg).exists()
        except OSError:  # a name no path can have (a long parts= list): an option
            return True

    paths = [a for a in argv if not is_option(a)]
    missing = [a for a in argv if is_option(a) and a.split("=", 1)[0] not in options]
    if not paths and missing:  # a sweep job's folder name mistyped: not 'got 0 folders'
        raise SaqError(f"no such folder: {missing[0]} (nor an option of this tool); usage: {usage}")
    if len(paths) != 1:
        raise SaqError(f"expected one folder, got {len(paths)}{': ' + ', '.join(paths) if paths else ''}; "
                       f"usage: {usage}")
    values = {}
    for arg in filter(is_option, argv):
        key, value = arg.split("=", 1)
        if key not in options:
            raise SaqError(f"unknown option {key!r}; usage: {usage}")
        if not value:  # `out=` would become Path("") = the current folder
            raise SaqError(f"{key}= is empty; give it a value (usage: {usage})")
        if options[key] is not None and value not in options[key]:
            raise SaqError(f"{key}={value!r} is not allowed; expected one of {list(options[key])}")
        if key in values:  # the first would be dropped without a word
            raise SaqError(f"{key}= is given twice ({values[key]!r} and {value!r}); give it once")
        values[key] = value
    return paths[0], values


def script_args(argv: Sequence[str], doc: str, kinds: dict[str, type]) -> dict:
    """{key: value} from a benchmark script's `key=value` arguments, each converted to its kind (int or str, or a
    tuple of the allowed words).
    -h/--help prints the script's docstring and exits 0; an argument that is not key=value, an unknown key or a
    value of the wrong kind is a SaqError naming it, with the usage line."""
    lines = doc.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().startswith("Usage:")), len(lines))
    block = [lines[start]] if start < len(lines) else []
    for line in lines[start + 1:]:  # continuation lines of the usage, indented under it
        if not line.startswith(" ") or not line.strip():
            break
        block.append(line)
    usage = " ".join(line.strip() for line in block)
    if any(a in ("-h", "--help") for a in argv):
        print(doc.strip())
        raise SystemExit(0)
    values = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in kinds:
            raise SaqError(f"{arg!r} is not one of this script's key=value options {sorted(kinds)}; {usage}")
        if not value:  # `data=` would be the current folder
            raise SaqError(f"{key}= is empty; give it a value; {usage}")
        if key in values:  # the first would be dropped without a word
            raise SaqError(f"{key}= is given twice; give it once; {usage}")
        if isinstance(kinds[key], tuple):
            if value not in kinds[key]:
                raise SaqError(f"{key}={value!r} is not allowed; expected one of {list(kinds[key])}; {usage}")
            values[key] = value
            continue
        try:
            values[key] = kinds[key](value)
        except ValueError:
            values[key] = None
        if values[key] is None or (kinds[key] is int and values[key] < 1):  # counts: images, iterations, threads
            raise SaqError(f"{key}={value!r} invalid; expected {'a whole number >= 1' if kinds[key] is int else 'text'}"
                           f"; {usage}")
    return values


def run_script(main, doc: str, kinds: dict[str, type], argv: Sequence[str] | None = None) -> int:
    """A benchmark script's entry: main(script_args(...)), with a SaqError printed as one line (exit status 2)."""
    import sys

    try:
        main(script_args(sys.argv[1:] if argv is None else argv, doc, kinds))
    except SaqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
