"""The ``parscale`` command: one entry point whose subcommands live in their own modules.

Usage::

    parscale sft --config recipes/qwen2.5-0.5b-code-p8.yaml      # every `trl sft` flag, plus ParScale's
    parscale eval --model_name_or_path MODEL --adapter ADAPTER       # held-out loss, HumanEval pass@k
    parscale import-official SRC OUT                             # a released qwen2_parscale checkpoint -> base + adapter
    parscale export-official BASE ADAPTER OUT                    # base + adapter -> a released-format checkpoint
    parscale --version

Each subcommand is a function ``(argv: list[str]) -> int`` in its own module that parses its own arguments (``parscale sft -h``
lists TRL's flags as well as ParScale's), so this module only dispatches, importing just the module it needs. The
dataclass-based subcommands parse with `CommandParser`, which reports a bad flag or value in one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

import yaml
from trl import TrlParser

from peft_parscale import __version__

# subcommand -> (module, function, one-line help)
COMMANDS = {
    "sft": (
        "peft_parscale.sft",
        "main",
        "train an adapter with TRL's SFTTrainer (launched through accelerate, like `trl sft`)",
    ),
    "eval": (
        "peft_parscale.eval",
        "main",
        "held-out loss and HumanEval pass@k of a model, with or without an adapter",
    ),
    "import-official": (
        "peft_parscale.interop",
        "import_official_main",
        "turn a released qwen2_parscale checkpoint into a base + adapter",
    ),
    "export-official": (
        "peft_parscale.interop",
        "export_official_main",
        "write a base + adapter as a released-format qwen2_parscale checkpoint",
    ),
}


class CommandParser(TrlParser):
    """TRL's parser (argument dataclasses, ``--config`` YAML files) for a ``parscale`` subcommand, where a bad flag or
    value ends in one line on stderr, ``PROG: error: ...``, and exit status 2 (argparse's convention).

    argparse prints its usage line before the error, and the usage line of ``parscale sft`` lists several hundred
    flags; the dataclasses' own checks (``__post_init__``) and a missing ``--config`` file raise a traceback. Both end
    here instead, in `error`.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the flags)\n")

    def parse_args_and_config(self, *args, **kwargs):
        try:
            return super().parse_args_and_config(*args, **kwargs)
        except (ValueError, OSError, yaml.YAMLError) as error:  # a dataclass's check; a --config file unread
            self.error(str(error))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parscale", description="ParScale adapters for transformers models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text) in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)  # the subcommand prints its own help
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help for -h, the version for --version, an error (exit 2) for a bad command
        parser.print_help(sys.stderr)
        return 2  # no command: nothing was done
    module_name, function_name, _ = COMMANDS[argv[0]]
    return getattr(importlib.import_module(module_name), function_name)(argv[1:]) or 0


if __name__ == "__main__":
    raise SystemExit(main())
