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


# ---- plan ------------------------------------------------------------------------------------

SMOLVLM_256M = dict(longest_edge=2048, tile_size=512, image_seq_len=64)  # geometry when no --model is given


def add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="show how an image is split into tiles and what it costs in tokens")
    p.add_argument("image", help="image file (PNG, JPEG, ...)")
    p.add_argument("--model", help="checkpoint folder whose processor settings to use "
                                   "(default: SmolVLM-256M geometry, 2048/512, 64 tokens per tile)")
    p.add_argument("--out", help="write a picture of the tile grid and the global tile to this PNG")
    p.add_argument("--longest-edge", type=int, help="override the stage-1 longest edge")
    p.add_argument("--tile-size", type=int, help="override the tile size")
    p.add_argument("--image-seq-len", type=int, help="override the <image> tokens per tile")
    p.add_argument("--no-split", action="store_true", help="plan without image splitting (one tile)")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from .components.splitter import SplitterConfig, plan_tiles, to_rgb

    overrides = {k: v for k, v in (("longest_edge", args.longest_edge), ("tile_size", args.tile_size))
                 if v is not None}
    sizes = {**overrides, "image_seq_len": args.image_seq_len}
    for name, value in sizes.items():
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.no_split:
        overrides["do_image_splitting"] = False
    rgb = to_rgb(args.image, where=f"image {args.image}")
    prompt_tokens = None
    if args.model:
        from .processing import Processor

        proc = Processor.from_pretrained(args.model, image_seq_len=args.image_seq_len, **overrides)
        cfg, seq_len = proc.splitter.config, proc.image_seq_len
        prompt_tokens = proc.plan(rgb.shape[1], rgb.shape[0]).prompt_tokens
    else:
        settings = {**SMOLVLM_256M, **overrides}
        seq_len = args.image_seq_len or settings.pop("image_seq_len")
        settings.pop("image_seq_len", None)
        cfg = SplitterConfig(**settings)
    plan = plan_tiles(rgb.shape[0], rgb.shape[1], cfg)
    _print_plan(args.image, plan, cfg, seq_len, prompt_tokens)
    if args.out:
        from .visualize import draw_plan

        draw_plan(rgb, plan, seq_len).save(args.out)
        print(f"picture       {args.out}")
    return 0


def _print_plan(name, plan, cfg, seq_len, prompt_tokens) -> None:
    print(f"image         {name}: {plan.width}x{plan.height} (width x height)")
    print(f"settings      longest_edge {cfg.longest_edge}, tile {cfg.tile_size}, "
          f"splitting {'on' if cfg.do_image_splitting else 'off'}, {seq_len} tokens per tile")
    print(f"resized       {plan.resized[1]}x{plan.resized[0]}, then {plan.grid_size[1]}x{plan.grid_size[0]}")
    print(f"rows          {plan.rows}")
    print(f"cols          {plan.cols}")
    print(f"tiles         {plan.tiles}" + (" (rows x cols + global)" if plan.rows * plan.cols else " (unsplit)"))
    print(f"image tokens  {plan.tiles * seq_len}")
    if prompt_tokens is not None:
        print(f"prompt tokens {prompt_tokens} (with the tile tags and newlines, for this tokenizer)")


# ---- entry point -----------------------------------------------------------------------------

PARSERS = [add_components_parser, add_demo_parser, add_plan_parser]


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
