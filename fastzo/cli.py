"""The `fastzo` command (also `python -m fastzo`).

Every command reports bad arguments as one line through argparse (``parser.error``: usage, the
message, exit status 2), never a traceback; the helpers below are the shared argument types.
"""

from __future__ import annotations

import argparse
import sys

COMMANDS = {
    "bench": ("fastzo.benchmark", "pass throughput and MeZO step cost on this machine"),
    "memory": ("fastzo.memory", "memory model: BP vs MeZO, largest model in a budget"),
    "finetune": ("fastzo.finetune", "fine-tune a classifier or causal LM with MeZO (or BP)"),
}


def usage() -> str:
    lines = ["usage: fastzo <command> [options]", "", "commands:"]
    lines += [f"  {name:9} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "fastzo <command> --help for the options of one command"]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv:
        print(f"fastzo: error: a command is required\n\n{usage()}", file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fastzo: error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[name][0])
    return module.cli_main(rest) or 0


# ------------------------------------------------------------------- argument types
def number(kind=float, *, minimum=None, strictly_positive=False):
    """An argparse type: a finite int or float, optionally >= minimum or > 0 (1e7 reads as an int)."""
    import math

    def parse(text: str):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not finite")
        if kind is int:
            if not value.is_integer():
                raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
            value = int(value)
        if strictly_positive and value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its message
    return parse


def comma_list(item=str, choices=None):
    """An argparse type: comma-separated values, each parsed by ``item`` and among ``choices``."""

    def parse(text: str):
        values = [v.strip() for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        out = []
        for v in values:
            if choices is not None and v not in choices:
                raise argparse.ArgumentTypeError(f"{v!r} is not one of {', '.join(choices)}")
            out.append(item(v))
        return out

    parse.__name__ = "list"
    return parse


def check_device(parser: argparse.ArgumentParser, text: str):
    """The torch.device named by ``text``, or parser.error if it is not usable here."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        parser.error(f"argument --device: {text!r} is not a device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"argument --device: {text!r}: this torch build or machine has no CUDA GPU; "
                         "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"argument --device: {text!r}: only {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        parser.error(f"argument --device: {text!r}: fastzo runs on cpu or cuda")
    return device


def check_backends(parser: argparse.ArgumentParser, names, device, option="--backends"):
    """parser.error unless every backend in ``names`` is available and runs on ``device``."""
    from .backends import BACKENDS, _errors, _load, supports

    for name in names:
        if name not in BACKENDS:
            parser.error(f"argument {option}: unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
        if _load(name) is None:
            reason = _errors.get(name)
            reason = str(reason).splitlines()[0] if reason else "failed to load"
            parser.error(f"argument {option}: backend {name!r} is not available here: {reason}")
        if not supports(name, device):
            parser.error(f"argument {option}: backend {name!r} does not run on device {device}")


if __name__ == "__main__":
    sys.exit(main())
