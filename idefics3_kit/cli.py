"""Command line: ``idefics3-kit <command>`` (also ``python -m idefics3_kit.cli``).

User errors (a missing file, a bad flag value, a bad checkpoint) print one readable line
and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
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
    p = sub.add_parser("demo", help="ask the shipped trained model about an example and a fresh image")
    p.add_argument("--model", metavar="DIR", help="checkpoint to use instead of the shipped demo model")
    p.add_argument("--preset", help="instead, build this preset (e.g. tiny) with random weights and show "
                                    "its component tree, parameters, image tokens and predicted next tokens")
    p.add_argument("--seed", type=int, help="seed of the freshly drawn image (default: the clock)")
    p.add_argument("--out", default="demo_split.png", help="where to write the tile-split picture "
                                                           "(default: demo_split.png)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from .recipes.demo import run as demo

    return demo.run(model_dir=args.model, preset=args.preset, seed=args.seed, split_picture=args.out)


# ---- plan ------------------------------------------------------------------------------------

DEFAULT_PRESET = "smolvlm-256m"  # geometry when no --model is given (the splitter's defaults are its)


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
    import dataclasses

    from .components.splitter import SplitterConfig, plan_tiles
    from .config import VLMConfig
    from .processing.images import to_rgb

    overrides = {k: v for k, v in (("longest_edge", args.longest_edge), ("tile_size", args.tile_size))
                 if v is not None}
    sizes = {**overrides, "image_seq_len": args.image_seq_len}
    for name, value in sizes.items():
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.no_split:
        overrides["do_image_splitting"] = False
    rgb = to_rgb(args.image, where=f"image {args.image}")
    if args.model:
        from .processing import Processor

        proc = Processor.from_pretrained(args.model, image_seq_len=args.image_seq_len, **overrides)
        cfg = proc.splitter.config
        plan = proc.plan(rgb.shape[1], rgb.shape[0])
    else:
        cfg = SplitterConfig(**overrides)
        seq_len = args.image_seq_len or VLMConfig.preset(DEFAULT_PRESET).image_seq_len
        plan = dataclasses.replace(plan_tiles(rgb.shape[0], rgb.shape[1], cfg), image_seq_len=seq_len)
    _print_plan(args.image, plan, cfg)
    if args.out:
        from .processing.picture import draw_plan, save_picture

        save_picture(draw_plan(rgb, plan, plan.image_seq_len), args.out)
        print(f"picture       {args.out}")
    return 0


def _print_plan(name, plan, cfg) -> None:
    print(f"image         {name}: {plan.width}x{plan.height} (width x height)")
    print(f"settings      longest_edge {cfg.longest_edge}, tile {cfg.tile_size}, "
          f"splitting {'on' if cfg.do_image_splitting else 'off'}, {plan.image_seq_len} tokens per tile")
    print(f"resized       {plan.resized[1]}x{plan.resized[0]}, then {plan.grid_size[1]}x{plan.grid_size[0]}")
    print(f"rows          {plan.rows}")
    print(f"cols          {plan.cols}")
    print(f"tiles         {plan.tiles}" + (" (rows x cols + global)" if plan.rows * plan.cols else " (unsplit)"))
    print(f"image tokens  {plan.image_tokens}")
    if plan.prompt_tokens is not None:
        print(f"prompt tokens {plan.prompt_tokens} (with the tile tags and newlines, for this tokenizer)")


# ---- shared: loading, images, sampling flags -------------------------------------------------

def _progress(**kw):
    """A progress bar on stderr (disabled by --no-progress; none without tqdm)."""
    from .train.progress import progress_bar

    return progress_bar(file=sys.stderr, dynamic_ncols=True, leave=False, **kw)


def _add_model_flags(p, dtype: bool = True) -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="checkpoint directory (config.json, safetensors, tokenizer and processor files)")
    if dtype:
        p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                       help="weights and activations dtype (default: fp32)")
        p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
        p.add_argument("--threads", type=int, default=None, metavar="N",
                       help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def _add_sampling_flags(p) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                   help="most tokens to generate (default: 256)")
    g.add_argument("--min-new-tokens", type=int, default=None, metavar="N",
                   help="tokens to generate before an eos may end the answer")
    g.add_argument("--sample", "--do-sample", dest="sample", action="store_true",
                   help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=None, help="softmax temperature (with --sample)")
    g.add_argument("--top-k", type=int, default=None, metavar="K", help="keep the K most likely tokens (with --sample)")
    g.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling mass (with --sample)")
    g.add_argument("--min-p", type=float, default=None, metavar="P",
                   help="drop tokens below P x the top probability (with --sample)")
    g.add_argument("--repetition-penalty", type=float, default=None, metavar="X",
                   help="transformers' repetition penalty (1.0: none)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling (reproducible output)")


def _sampling_kwargs(args) -> dict:
    """The generation flags as generate's keyword arguments, checked before any loading."""
    from .generation import resolve_settings

    kw = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens, do_sample=args.sample,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
              repetition_penalty=args.repetition_penalty)
    kw = {k: v for k, v in kw.items() if v is not None}
    try:
        resolve_settings({}, None, **kw)
    except ValueError as exc:
        flag, _, rest = str(exc).partition(" ")
        raise UserError(f"--{flag.replace('_', '-')} {rest}") from None
    if args.seed is not None:
        kw["seed"] = args.seed
    return kw


def _check_runtime_flags(args) -> None:
    """--device and --threads, refused before minutes of loading rather than after."""
    import torch

    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    device_name = getattr(args, "device", None)
    if device_name is None:
        return
    try:
        device = torch.device(device_name)
    except RuntimeError:
        raise UserError(f"--device {device_name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device_name}: no CUDA GPU is available to this torch "
                            f"({torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {device_name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type not in ("cpu", "meta") and not hasattr(torch, device.type):
        raise UserError(f"--device {device_name}: unsupported device type")


def _import_processor():
    try:
        from .processing import Processor
    except ImportError as exc:
        raise UserError(f"the Processor (idefics3_kit.processing) is not available in this installation ({exc})") \
            from None
    return Processor


def _load(args, with_processor: bool = True):
    """(model, processor) with a progress bar over the loading stages."""
    import torch

    from .hf import resolve_dtype
    from .model import VLM

    if not os.path.isdir(args.model):
        raise UserError(f"model directory not found: {args.model}")
    _check_runtime_flags(args)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    stages = ["weights"] + (["processor"] if with_processor else [])
    proc = None
    with _progress(total=len(stages), desc="loading", unit="part", disable=args.no_progress) as bar:
        bar.set_postfix_str("weights")
        model = VLM.from_pretrained(args.model, dtype=resolve_dtype(args.dtype), device=args.device)
        bar.update()
        if with_processor:
            bar.set_postfix_str("processor")
            proc = _import_processor().from_pretrained(args.model)
            bar.update()
    return model, proc


def _open_image(path: str):
    """A decoded image (uint8 RGB tensor) for a path the user gave, or a one-line error."""

    from .processing.images import to_rgb

    if not os.path.lexists(path):
        raise UserError(f"image not found: {path}")
    try:
        return to_rgb(path, where=f"image {path}")
    except ValueError as exc:
        raise UserError(f"cannot read image {path}: {exc}") from None


def _user_message(text: str, n_images: int) -> dict:
    content = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def _answer(model, proc, messages, images, args, stream: bool, out=None) -> str:
    """Run one turn: template -> processor -> generate; print the answer (streamed or at the end)."""
    import torch

    from .streaming import TextStreamer

    out = out or sys.stdout
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    batch = proc(text=[prompt], images=[images] if images else None, return_tensors="pt", padding=True)
    batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
             if k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")}
    kw = _sampling_kwargs(args)
    context = model.config.decoder.max_position_embeddings
    if batch["input_ids"].shape[1] >= context:
        raise UserError(f"the prompt has {batch['input_ids'].shape[1]} tokens but the model's context is "
                        f"{context}; use fewer or smaller images or a shorter conversation")
    pieces: list[str] = []

    def show(t: str) -> None:
        pieces.append(t)
        out.write(t)
        out.flush()

    text_streamer = TextStreamer(proc, show) if stream else None
    total = min(kw["max_new_tokens"], context - batch["input_ids"].shape[1])
    with _progress(total=total, desc="generating", unit="tok", disable=args.no_progress or stream) as bar:
        class _Streamer:
            prompt_seen = False  # generate sends the prompt first, as transformers does

            def put(self, ids):
                if self.prompt_seen:
                    bar.update(1)
                self.prompt_seen = True
                if text_streamer is not None:
                    text_streamer.put(ids)

            def end(self):
                if text_streamer is not None:
                    text_streamer.end()

        ids = model.generate(**batch, streamer=_Streamer(), **kw)
    if stream:
        out.write("\n")
        return "".join(pieces)
    text = proc.decode(ids[0, batch["input_ids"].shape[1]:].tolist(), skip_special_tokens=True)
    out.write(text + "\n")
    return text


# ---- generate --------------------------------------------------------------------------------

def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="answer one prompt about zero or more images",
                       description="Answer one prompt (with images) using the checkpoint's chat template.")
    _add_model_flags(p)
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image file; repeat for several images (placed before the prompt)")
    p.add_argument("--prompt", required=True, help="the question or instruction")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    _sampling_kwargs(args)
    _check_runtime_flags(args)
    images = [_open_image(path) for path in args.image]
    model, proc = _load(args)
    _answer(model, proc, [_user_message(args.prompt, len(images))], images, args, stream=args.stream)
    return 0


# ---- chat ------------------------------------------------------------------------------------

CHAT_HELP = """commands: /image PATH  attach an image to your next message
          /reset       forget the conversation
          /quit        leave (or Ctrl-D)"""


def add_chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="multi-turn conversation in the terminal (images by path)",
                       description="Multi-turn chat. " + CHAT_HELP.replace("\n", " "))
    _add_model_flags(p)
    p.add_argument("--no-stream", action="store_true", help="print each answer at once instead of streaming it")
    _add_sampling_flags(p)
    p.set_defaults(func=cmd_chat)


HISTORY_FILE = os.path.join(os.path.expanduser("~"), ".cache", "idefics3_kit", "chat_history")


def _line_editing() -> None:
    """Arrow keys, editing and a history kept between sessions for ``chat`` on a terminal (readline);
    nothing when stdin is a pipe or readline is missing."""
    if not sys.stdin.isatty():
        return
    try:
        import atexit
        import readline
    except ImportError:
        return
    try:
        readline.read_history_file(HISTORY_FILE)
    except OSError:
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            os.makedirs(os.path.dirname(HISTORY_FILE), exist_ok=True)
            readline.write_history_file(HISTORY_FILE)
        except OSError:
            pass
    atexit.register(save)


def _is_text(line: str) -> bool:
    """False for a line read from bytes that are not valid text (kept as lone surrogates)."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def cmd_chat(args) -> int:
    _sampling_kwargs(args)
    if hasattr(sys.stdin, "reconfigure"):  # an undecodable line must not end the conversation (or lose input)
        sys.stdin.reconfigure(errors="surrogateescape")
    from .model import SERVING_DECODER_PACK_BYTES

    model, proc = _load(args)
    model.enable_feature_cache()  # every turn sends the conversation's images again: their tiles are encoded once
    # CPU bf16: the tower's matmuls (and a small decoder's prefill) skip the per-call weight re-layout (0 B elsewhere)
    model.enable_packed_weights(decoder_max_bytes=SERVING_DECODER_PACK_BYTES)
    _line_editing()
    print(CHAT_HELP, file=sys.stderr)
    messages: list[dict] = []
    images: list = []  # PIL images of the conversation so far
    pending: list = []  # images attached (/image) to the next message
    while True:
        try:
            line = input("user> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line, like Python's own prompt
            print(file=sys.stderr)
            continue
        if not _is_text(line):  # bytes that are not UTF-8: say so, keep the conversation
            print("error: the line is not valid UTF-8 text; it was skipped", file=sys.stderr)
            continue
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            messages, images, pending = [], [], []
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                pending.append(_open_image(path))
                print(f"(image attached: {path})", file=sys.stderr)
            except UserError as exc:  # a typo must not end the conversation
                print(f"error: {exc}", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}\n{CHAT_HELP}", file=sys.stderr)
            continue
        turn = messages + [_user_message(line, len(pending))]
        print("assistant> ", end="", flush=True)
        try:
            answer = _answer(model, proc, turn, images + pending, args, stream=not args.no_stream)
        except UserError as exc:
            print(f"\nerror: {exc}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat (Ctrl-D or /quit ends it)
            print("\n(answer stopped; the turn was not kept)", file=sys.stderr)
            continue
        messages = turn + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        images, pending = images + pending, []


# ---- inspect ---------------------------------------------------------------------------------

def add_inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="component tree, parameters per component, token budget",
                       description="Describe a checkpoint without loading its weights: components, parameter "
                                   "counts (from the safetensors headers), context and image-token budget.")
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image file whose token cost to report; repeatable")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:

    from .config import VLMConfig
    from .hf import weights

    if not os.path.isdir(args.model):
        raise UserError(f"model directory not found: {args.model}")
    images = [(path, _open_image(path)) for path in args.image]
    cfg = VLMConfig.from_pretrained(args.model)
    shapes = weights.read_header_shapes(weights.checkpoint_files(args.model))
    counts = {"vision": 0, "connector": 0, "decoder": 0, "other": 0}
    for hf_name, shape in shapes.items():
        ours = (weights.from_hf_name(hf_name) or "other").split(".")[0]
        n = 1
        for d in shape:
            n *= d
        counts[ours if ours in counts else "other"] += n
    total = sum(counts.values())
    print(f"{args.model}")
    print(f"VLM ({total:,} parameters)")
    details = {
        "vision": f"image {getattr(cfg.vision, 'image_size', '?')}px, patch {getattr(cfg.vision, 'patch_size', '?')}, "
                  f"{getattr(cfg.vision, 'num_hidden_layers', '?')} layers, hidden {getattr(cfg.vision, 'hidden_size', '?')}",
        "connector": f"scale factor {cfg.connector.scale_factor}, {cfg.connector.in_dim} -> {cfg.connector.out_dim}",
        "decoder": f"{cfg.decoder.num_hidden_layers} layers, hidden {cfg.decoder.hidden_size}, heads "
                   f"{cfg.decoder.num_attention_heads}/{cfg.decoder.num_key_value_heads} kv, "
                   f"vocab {cfg.decoder.vocab_size}",
    }
    for kind in ("vision", "connector", "decoder"):
        name = getattr(getattr(cfg, kind), "name", "?")
        share = 100 * counts[kind] / total if total else 0
        print(f"  {kind:9s} {name:14s} {counts[kind]:>14,} parameters ({share:4.1f}%)  {details[kind]}")
    if counts["other"]:
        print(f"  {'other':9s} {'':14s} {counts['other']:>14,} parameters (not used by the model)")
    context = cfg.decoder.max_position_embeddings
    print(f"context: {context:,} tokens; {cfg.image_seq_len} image tokens per tile; image token id "
          f"{cfg.image_token_id}")
    if images:
        plan_of = _planner(args.model, cfg)
        used = 0
        for path, rgb in images:
            plan = plan_of(rgb)
            used += plan.prompt_tokens if plan.prompt_tokens is not None else plan.image_tokens
            grid = f"{plan.rows}x{plan.cols} tiles + global" if plan.rows * plan.cols else "1 tile"
            cost = (f"{plan.prompt_tokens:,} prompt tokens with the tags" if plan.prompt_tokens is not None
                    else "tag tokens not counted: no tokenizer in the checkpoint")
            print(f"image {path}: {rgb.shape[1]}x{rgb.shape[0]} px -> {grid} = {plan.tiles} tiles x "
                  f"{cfg.image_seq_len} = {plan.image_tokens:,} image tokens ({cost})")
        print(f"token budget: {used:,} of {context:,} tokens for the images, {context - used:,} left for text "
              "and the answer")
    return 0


def _planner(path: str, cfg):
    """rgb -> TilePlan: the checkpoint's processor when it loads (exact prompt tokens), else the
    image settings alone, else 4 tiles x the vision tile."""
    import dataclasses

    from . import files
    from .components.splitter import SplitterConfig, plan_tiles
    from .processing import Processor
    from .processing.processor import image_settings

    try:
        proc = Processor.from_pretrained(path, image_seq_len=cfg.image_seq_len)
        return lambda rgb: proc.plan(rgb.shape[1], rgb.shape[0])
    except ValueError:
        pass
    try:
        proc_cfg = files.read_json_if_exists(f"{path}/processor_config.json", "processor_config.json")
        splitter = SplitterConfig.from_hf(image_settings(path, proc_cfg))
    except ValueError:
        tile = getattr(cfg.vision, "image_size", 512)
        splitter = SplitterConfig(longest_edge=4 * tile, tile_size=tile)
    return lambda rgb: dataclasses.replace(plan_tiles(rgb.shape[0], rgb.shape[1], splitter),
                                           image_seq_len=cfg.image_seq_len)


# ---- train -----------------------------------------------------------------------------------

def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="fine-tune (or resume) a model from a training config (JSON or YAML)",
                       description="Fine-tune a model as a training config says (docs/finetune.md documents every "
                                   "field). Resumes from OUT_DIR/checkpoints/latest when there is one. Under torchrun "
                                   "(torchrun --nproc_per_node N -m idefics3_kit.cli train ...) every process runs it.")
    p.add_argument("--config", required=True, metavar="FILE",
                   help="training config, .json or .yaml (see configs/demo_train.json and docs/finetune.md)")
    p.add_argument("--steps", type=int, help="override the number of optimizer steps")
    p.add_argument("--out-dir", help="override where checkpoints and metrics go")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from .recipes import demo  # noqa: F401  (registers the demo's synthetic data source and model)
    from .train import TrainConfig, Trainer

    cfg = TrainConfig.from_file(args.config)
    if args.steps is not None:
        cfg.steps = args.steps
    if args.out_dir is not None:
        cfg.out_dir = args.out_dir
    cfg.validate()
    trainer = Trainer(config=cfg, progress=not args.no_progress)
    trainer.fit()
    if trainer.runtime.is_main:
        print(f"checkpoint: {cfg.out_dir}/checkpoints/latest; Hugging Face checkpoint: {cfg.out_dir}/final")
    return 0


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a training run's newest checkpoint as a Hugging Face checkpoint",
                       description="Write the newest checkpoint of a training run as a Hugging Face checkpoint "
                                   "(LoRA merged), or with --adapter the LoRA adapter alone in peft's layout.")
    p.add_argument("--run", required=True, metavar="OUT_DIR", help="the run's out_dir")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the checkpoint")
    p.add_argument("--adapter", action="store_true", help="write only the LoRA adapter (peft's layout)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:

    from .recipes import demo  # noqa: F401  (a demo run's model builder)
    from .train import Trainer

    if not os.path.isdir(args.run):
        raise UserError(f"run directory not found: {args.run}")
    trainer = Trainer.from_run(args.run, progress=False)
    trainer.export(args.out, adapter=args.adapter)
    print(f"exported step {trainer.step} of {args.run} to {args.out}")
    return 0


# ---- serve -----------------------------------------------------------------------------------

SERVE_INSTALL = 'pip install -c constraints.txt "idefics3_kit[serve]"'


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over OpenAI's chat API (HTTP, batching, streaming)",
                       description="Serve MODEL_DIR with an OpenAI-compatible HTTP API: POST /v1/chat/completions "
                                   "(text and images, streaming), GET /v1/models, /health, /metrics. Needs the "
                                   f"serve extra ({SERVE_INSTALL}). docs/serve.md explains every flag.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="checkpoint directory (weights, tokenizer, processor files)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="weights dtype (default: fp32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quantization", default="none", choices=["none", "int8", "int4"],
                   help="int8 / int4: the decoder's weights quantized as they load (docs/quantization.md; default: none)")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model id clients send and /v1/models lists (default: the folder's name)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/* (default: the "
                                                    "IDEFICS3_KIT_API_KEY environment variable, else open)")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch-size", type=int, default=8, metavar="N",
                   help="rows decoded together; a request with n choices takes n rows (default: 8)")
    g.add_argument("--batch-window-ms", type=float, default=10.0, metavar="MS",
                   help="how long a new batch waits for more requests to join it (default: 10)")
    g.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for the engine before 429 + Retry-After (default: 64)")
    g.add_argument("--max-body-bytes", type=int, default=20 * 1024 * 1024, metavar="BYTES",
                   help="largest request body; more is a 413 (default: 20 MiB)")
    g.add_argument("--max-images-per-request", type=int, default=8, metavar="N", help="(default: 8)")
    g.add_argument("--max-image-pixels", type=int, default=4096 * 4096, metavar="N",
                   help="pixels per image, read from the header before decoding (default: 4096x4096)")
    g.add_argument("--max-tokens-cap", type=int, default=1024, metavar="N",
                   help="the most new tokens one request may ask for (default: 1024)")
    g.add_argument("--default-max-tokens", type=int, default=256, metavar="N",
                   help="new tokens when a request sets no max_tokens (default: 256, bounded by the context)")
    g.add_argument("--request-timeout", type=float, default=300.0, metavar="S",
                   help="seconds a request may wait and generate before a 504 (default: 300)")
    g.add_argument("--allowed-image-dir", metavar="DIR",
                   help="serve local image paths (file:// or plain) from under DIR only (default: none allowed)")
    g.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (size and time limited; the server then reaches any URL it is "
                        "given, internal addresses included)")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: info)")
    p.set_defaults(func=cmd_serve)


def _serve_settings(args):
    """ServeSettings from the flags, refused (one line) before the model loads."""
    try:
        from .serve.settings import ServeSettings
    except ImportError as exc:
        raise UserError(f"the serve command needs FastAPI and uvicorn: {SERVE_INSTALL} ({exc})") from None
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    if args.allowed_image_dir is not None and not os.path.isdir(args.allowed_image_dir):
        raise UserError(f"--allowed-image-dir {args.allowed_image_dir}: not a directory")
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model_dir))
    values = dict(model_name=name, api_key=args.api_key or os.environ.get("IDEFICS3_KIT_API_KEY") or None,
                  max_batch_size=args.max_batch_size, batch_window_ms=args.batch_window_ms, max_queue=args.max_queue,
                  max_body_bytes=args.max_body_bytes, max_images_per_request=args.max_images_per_request,
                  max_image_pixels=args.max_image_pixels, max_tokens_cap=args.max_tokens_cap,
                  default_max_tokens=args.default_max_tokens, request_timeout_s=args.request_timeout,
                  allowed_image_dir=args.allowed_image_dir, allow_remote_images=args.allow_remote_images)
    try:
        return ServeSettings(**values)
    except ValueError as exc:
        field, _, rest = str(exc).partition(" ")
        flag = {"model_name": "served-model-name", "request_timeout_s": "request-timeout"}.get(field, field)
        raise UserError(f"--{flag.replace('_', '-')} {rest}") from None


def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UserError(f"the serve command needs FastAPI and uvicorn: {SERVE_INSTALL} (missing: {exc.name})") \
            from None
    settings = _serve_settings(args)
    if not os.path.isdir(args.model_dir):
        raise UserError(f"model directory not found: {args.model_dir}")
    _check_runtime_flags(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from .serve import server

    server.run(args.model_dir, settings, host=args.host, port=args.port, dtype=args.dtype, device=args.device,
               quantization=args.quantization, log_level=args.log_level)
    return 0


# ---- entry point -----------------------------------------------------------------------------

PARSERS = [add_components_parser, add_demo_parser, add_plan_parser, add_generate_parser, add_chat_parser,
           add_inspect_parser, add_train_parser, add_export_parser, add_serve_parser]


class _Parser(argparse.ArgumentParser):
    """Bad flags are reported on one line (plus where to look), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    from .version import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="idefics3-kit", description="Idefics3 / SmolVLM toolkit")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"idefics3-kit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in PARSERS:
        add(sub)
    return parser


# What a user's input can cause (a file, a flag, a checkpoint): one line, exit status 2.
USER_ERRORS = (UserError, OSError, ValueError, KeyError, TypeError, ArithmeticError, ImportError)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"idefics3-kit {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug of ours: still one line, the traceback one flag away
        if args.debug:
            raise
        print(f"idefics3-kit {args.command}: internal error: {type(exc).__name__}: {exc} "
              "(run again with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
