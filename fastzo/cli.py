"""The `fastzo` command (also `python -m fastzo`)."""

from __future__ import annotations

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
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fastzo: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[name][0])
    return module.cli_main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
