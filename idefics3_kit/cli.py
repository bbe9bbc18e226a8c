"""Command line: ``idefics3-kit <command>`` (also ``python -m idefics3_kit.cli``).

User errors (a missing file, a bad flag value, a bad checkpoint) print one readable line
and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys


class UserError(Exception):
    """An error caused by the user's input, reported as one line without a traceback."""


# ---- components ------------------------------------------------------------------------------

def add_components_parser(sub) -> None:
    p = sub.add_parser("components", help="list the registered components (plugins included)")
    p.set_defaults(func=cmd_components)


def cmd_components(args) -> int:
    from . import registry

    for kind, names in registry.list_components().items():
        print(f"{kind:10s} {', '.join(names) if names else '(none)'}")
    return 0


# ---- demo ------------------------------------------------------------------------------------

def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="build the tiny preset model and run it on a generated image")
    p.add_argument("--preset", default="tiny", help="model preset to build with random weights (default: tiny)")
    p.add_argument("--seed", type=int, default=0, help="random seed for weights and image (default: 0)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from . import demo

    return demo.run(preset=args.preset, seed=args.seed)


# ---- entry point -----------------------------------------------------------------------------

PARSERS = [add_components_parser, add_demo_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idefics3-kit", description="Idefics3 / SmolVLM toolkit")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in PARSERS:
        add(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UserError, FileNotFoundError, ValueError, KeyError) as exc:
        if args.debug:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"idefics3-kit {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
