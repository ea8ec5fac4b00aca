"""`coordexp-client ask`: one image + one prompt -> the model's raw text and the parsed objects.

    coordexp-client ask --url localhost:8001 --image cat.jpg [--prompt "find the cat"]
    echo "find the cat" | coordexp-client ask --local CKPT --image cat.jpg --prompt -
    coordexp-client ask --url localhost:8001 --image cat.jpg --json --draw cat_boxes.png
    coordexp-client ask --url localhost:8001 --interactive

The model is a Triton server (`--url`, `--model`) or a local engine (`--local CKPT --engine
torch|onnx`); the output is the same either way: the raw text, then a table (desc, type, grid
points, pixel box), or with `--json` one JSON object per answer.

`--interactive` keeps the connection (or the loaded engine) and reads one turn per line:

    image.png | find the red circle     an image and a prompt
    image.png                           an image with the default prompt (or --prompt)
    find the blue square                another prompt for the last image
    quit                                (or exit, or end of input) leaves

Exit status: 0 answered (even when the answer does not parse: that is reported), 1 the image
or the generation failed, 2 bad arguments or a model that cannot be used.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from coordexp.client.options import (add_decoding_args, add_local_engine_args, add_openai_args, add_prompt_args,
                                     params_from_args)
from coordexp.dataset import DEFAULT_MAX_PIXELS

QUIT = {"quit", "exit", "q", ":q"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ask", help="ask a model about one image (single-shot or interactive)",
                       description="Send one image and a prompt to a Triton server (--url) or a local engine "
                                   "(--local CKPT) and print the raw answer and the parsed objects.")
    p.add_argument("--image", help="image file (required unless --interactive)")
    p.add_argument("--json", action="store_true", help="print one JSON object per answer instead of a table")
    p.add_argument("--draw", metavar="OUT.png", help="save the image with the predicted boxes/polygons drawn on it "
                                                     "(interactive: OUT_1.png, OUT_2.png, ...)")
    p.add_argument("--interactive", action="store_true", help="read 'IMAGE | PROMPT' turns from stdin")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images")
    s = p.add_argument_group("Triton server")
    s.add_argument("--url", help="HOST:PORT of a Triton gRPC endpoint")
    s.add_argument("--model", default="coordexp", help="served model (ensemble) name")
    s.add_argument("--stream", action="store_true",
                   help="stream the answer from the streaming ensemble (<model>_stream): the text is written to "
                        "stderr token by token as it is generated; stdout gets the final answer as usual")
    s.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    s.add_argument("--retries", type=int, default=2)
    add_local_engine_args(p)
    add_openai_args(p)
    add_decoding_args(p)
    add_prompt_args(p)
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------------------------
# Model sources: the same `generate` for a server and a local engine


class RemoteSource:
    """A Triton server (a `TritonEngine`: one event loop and one gRPC channel for the whole session)."""

    def __init__(self, args: argparse.Namespace, params):
        from coordexp.client.options import prompt_overrides
        from coordexp.engines.triton import ClientOptions, PreflightError, TritonEngine
        from coordexp.engines.triton.interface import request_problems
        from coordexp.wire import stream_ensemble_name

        model = stream_ensemble_name(args.model) if getattr(args, "stream", False) else args.model
        self.engine = TritonEngine.connect([args.url], ClientOptions(
            model=model, timeout=args.timeout, retries=args.retries, wait_for_server=min(10.0, args.timeout)))
        self.explicit = (args.max_new_tokens is not None, args.repetition_penalty is not None)
        params = self.engine.fit_params(params, *self.explicit)
        problems = request_problems(self.engine.iface, self.engine.manifest, params, args.user_text,
                                    prompt_overrides(args))
        if problems:
            self.close()
            raise PreflightError("; ".join(problems))
        self.default_text = self.engine.prompt.user_text
        self.bbox_format = self.engine.prompt.bbox_format  # how the served model writes boxes

    def generate(self, image_bytes: bytes, image, params, user_text: str | None):
        from coordexp.engines.triton import AllServersDown
        from coordexp.generation import GenerationResult

        params = self.engine.fit_params(params, *self.explicit)

        shown = [""]

        def show(partial) -> None:  # the text so far -> its new part, as it arrives
            if partial.text.startswith(shown[0]):
                sys.stderr.write(partial.text[len(shown[0]):])
                sys.stderr.flush()
                shown[0] = partial.text

        streaming = self.engine.iface.streams
        try:
            gen, _ = self.engine.run(self.engine.pool.generate(
                image_bytes, params, user_text, on_partial=show if streaming else None))
        except AllServersDown as e:
            return GenerationResult(text="", error=str(e))
        finally:
            if streaming and shown[0]:
                sys.stderr.write("\n")
        return gen

    def close(self) -> None:
        self.engine.close()


class OpenAISource:
    """An OpenAI-compatible server (`--openai-url`: ours, or a peer's with --run-config)."""

    def __init__(self, args: argparse.Namespace, params):
        from coordexp.client.options import openai_engine

        self.engine = openai_engine(argparse.Namespace(**{**vars(args), "user_text": None, "concurrency": 1}))
        self.stream = bool(args.stream)
        self.explicit = (args.max_new_tokens is not None, args.repetition_penalty is not None)
        problems = self.engine.problems(self.engine.fit_params(params, *self.explicit))
        if problems:
            self.close()
            from coordexp.engines.openai_client import OpenAIServerError

            raise OpenAIServerError("; ".join(problems))
        self.default_text = self.engine.prompt.user_text
        self.bbox_format = self.engine.prompt.bbox_format

    def generate(self, image_bytes: bytes, image, params, user_text: str | None):
        from coordexp.generation import RequestPrompt

        params = self.engine.fit_params(params, *self.explicit)
        shown = [""]

        def show(partial) -> None:
            if partial.text.startswith(shown[0]):
                sys.stderr.write(partial.text[len(shown[0]):])
                sys.stderr.flush()
                shown[0] = partial.text

        parts = RequestPrompt(user_text or self.engine.parts.user_text, self.engine.parts.system_text,
                              self.engine.parts.layout)
        try:
            gen, _ = self.engine.run(self.engine.pool.generate(image_bytes, params, parts, stream=self.stream,
                                                               on_partial=show if self.stream else None))
        finally:
            if self.stream and shown[0]:
                sys.stderr.write("\n")
        return gen

    def close(self) -> None:
        self.engine.close()


class LocalSource:
    """An in-process engine (coordexp.engines.load_engine), loaded once."""

    def __init__(self, args: argparse.Namespace, params):
        from coordexp.client.options import local_engine

        self.engine = local_engine(argparse.Namespace(**{**vars(args), "user_text": None}))
        self.base = self.engine.prompt
        self.default_text = self.base.user_text
        self.bbox_format = self.base.bbox_format

    def generate(self, image_bytes: bytes, image, params, user_text: str | None):
        from coordexp.generation import GenerationResult, RequestPrompt

        try:
            return self.engine.generate_batch([image], params, RequestPrompt(user_text=user_text or None))[0]
        except Exception as e:
            return GenerationResult(text="", error=f"{type(e).__name__}: {e}")

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# One turn


class TurnError(Exception):
    """The image or the generation failed for this turn."""


def load_image(path: str, max_pixels: int):
    """(bytes, PIL RGB image, width, height); TurnError with the contract's error code."""
    import io

    from PIL import Image

    from coordexp.dataset import check_image_bytes
    from coordexp.schema import ContractError

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TurnError(f"image_load_failed: {path}: cannot read image ({e.strerror or e})") from None
    try:
        w, h = check_image_bytes(data, path, max_pixels)
        img = Image.open(io.BytesIO(data)).convert("RGB")
    except ContractError as e:
        raise TurnError(f"{e.code}: {e.message}") from None
    except Exception as e:
        raise TurnError(f"image_load_failed: {path}: cannot decode image ({e})") from None
    return data, img, w, h


def answer(source, path: str, prompt: str | None, params, max_pixels: int) -> tuple[dict[str, Any], Any]:
    """Ask about one image -> (the answer as a JSON-able dict, the PIL image)."""
    from coordexp.dataset import DatasetItem
    from coordexp.grid import bbox_of, to_pixels
    from coordexp.runner import prediction_from_generation

    data, img, w, h = load_image(path, max_pixels)
    gen = source.generate(data, img, params, prompt)
    if gen.error:
        raise TurnError(f"generation_failed: {gen.error}")
    item = DatasetItem(index=0, line_no=1, images=[path], width=w, height=h, image_path=path)
    rec = prediction_from_generation(item, gen, bbox_format=source.bbox_format).to_dict()
    for p in rec["preds"]:
        px = to_pixels(p["points"], w, h, rec["coord_mode"])
        p["pixel_points"] = [round(v, 2) for v in px]
        p["pixel_box"] = [round(v, 2) for v in bbox_of(px)]
    out = {"image": path, "width": w, "height": h, "prompt": prompt if prompt is not None else source.default_text,
           "coord_mode": rec["coord_mode"], "bbox_format": rec["bbox_format"], "raw_output": rec["raw_output"],
           "preds": rec["preds"],
           "num_tokens": rec.get("num_tokens"), "finish_reason": rec.get("finish_reason")}
    for key in ("guided", "guided_closed_early"):  # what guided decoding did, as on prediction lines
        if key in rec:
            out[key] = rec[key]
    for key in ("error", "error_message", "repairs"):
        if rec.get(key):
            out[key] = rec[key]
    return out, img


def format_table(ans: dict[str, Any]) -> str:
    lines = [f"image:  {ans['image']} ({ans['width']}x{ans['height']})", f"prompt: {ans['prompt']}",
             f"raw:    {ans['raw_output']}"]
    preds = ans["preds"]
    if ans.get("error"):
        lines.append(f"error:  {ans['error']}: {ans.get('error_message') or ''}".rstrip())
    for r in ans.get("repairs") or []:
        lines.append(f"repair: {r}")
    if ans.get("guided"):
        lines.append("guided: closed early (the token budget ran out: fewer objects than the model wanted)"
                     if ans.get("guided_closed_early") else "guided: yes")
    if not preds:
        lines.append("objects: none")
        return "\n".join(lines)
    rows = [("#", "desc", "type", "grid points", "pixel box (x1, y1, x2, y2)")]
    for i, p in enumerate(preds):
        box = ", ".join(f"{v:.1f}" for v in p["pixel_box"])
        rows.append((str(i), p["desc"], p["type"], "[" + ", ".join(str(v) for v in p["points"]) + "]", f"[{box}]"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines.append(f"objects: {len(preds)}")
    for r in rows:
        lines.append("  ".join(cell.ljust(widths[c]) for c, cell in enumerate(r)).rstrip())
    return "\n".join(lines)


DRAW_MIN_SIZE, DRAW_MAX_SIZE = 384, 1280  # the vis overlays' panel sizes


def draw(img, preds: list[dict[str, Any]], out_path: str) -> str:
    """Save `img` with the predictions drawn by the `vis` annotators (the look of the overlays)."""
    from coordexp.vis import draw_predictions

    os.makedirs(os.path.dirname(os.path.abspath(out_path)) or ".", exist_ok=True)
    # small images are drawn upscaled, as vis does, so labels do not cover the objects
    draw_predictions(img, preds, min_size=DRAW_MIN_SIZE, max_size=DRAW_MAX_SIZE).save(out_path)
    return out_path


def _draw_path(base: str, turn: int | None) -> str:
    if turn is None:
        return base
    stem, ext = os.path.splitext(base)
    return f"{stem}_{turn}{ext or '.png'}"


def emit(ans: dict[str, Any], img, args: argparse.Namespace, turn: int | None = None) -> None:
    if args.draw:
        ans["drawn"] = draw(img, ans["preds"], _draw_path(args.draw, turn))
    if args.json:
        print(json.dumps(ans, ensure_ascii=False), flush=True)
    else:
        print(format_table(ans) + ("\n" + f"drawn:  {ans['drawn']}" if args.draw else ""), flush=True)


# ---------------------------------------------------------------------------------------------


def parse_turn(line: str, last_image: str | None) -> tuple[str | None, str | None]:
    """One interactive line -> (image path, prompt or None); image None: nothing to run."""
    text = line.strip()
    if not text:
        return None, None
    if "|" in text:
        image, prompt = (part.strip() for part in text.split("|", 1))
        return (image or last_image), (prompt or None)
    if os.path.isfile(os.path.expanduser(text)):
        return text, None
    return last_image, text


def _interactive(source, args, params) -> int:
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
    last_image: str | None = args.image
    turn = 0
    if tty:
        print("one turn per line: 'IMAGE | PROMPT', 'IMAGE', or a PROMPT for the last image; 'quit' leaves",
              file=sys.stderr)
    while True:
        if tty:
            try:
                line = input("> ") + "\n"  # input() gets readline's editing and history
            except EOFError:
                break
        else:
            line = sys.stdin.readline()
        if not line:  # EOF
            break
        if line.strip().lower() in QUIT:
            break
        image, prompt = parse_turn(line, last_image)
        if image is None:
            if line.strip():
                print("error: no image yet: start with 'IMAGE | PROMPT'", file=sys.stderr, flush=True)
            continue
        image = os.path.expanduser(image)
        turn += 1
        try:
            ans, img = answer(source, image, prompt if prompt is not None else args.user_text, params,
                              args.max_pixels)
        except TurnError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        last_image = image
        emit(ans, img, args, turn)
    return 0


def run(args: argparse.Namespace) -> int:
    from coordexp.engines.triton.connect import PreflightError

    if sum(map(bool, (args.url, args.local, args.openai_url))) != 1:
        print("error: give one of --url HOST:PORT, --openai-url URL or --local CKPT", file=sys.stderr)
        return 2
    if not args.interactive and not args.image:
        print("error: --image is required (or use --interactive)", file=sys.stderr)
        return 2
    if args.stream and not (args.url or args.openai_url):
        print("error: --stream needs --url or --openai-url (a server that streams)", file=sys.stderr)
        return 2
    if args.user_text == "-":
        if args.interactive:
            print("error: --prompt - reads the prompt from stdin, which --interactive uses for turns", file=sys.stderr)
            return 2
        args.user_text = sys.stdin.read().strip() or None
    try:
        params = params_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from coordexp.engines.openai_client import OpenAIServerError

    try:
        source = (RemoteSource(args, params) if args.url else OpenAISource(args, params) if args.openai_url
                  else LocalSource(args, params))
    except (PreflightError, OpenAIServerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"error: cannot load {args.engine} engine from {args.local}: {e}", file=sys.stderr)
        return 2
    try:
        if args.interactive:
            return _interactive(source, args, params)
        return _once(source, args, params)
    except BrokenPipeError:  # `ask ... | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        source.close()


def _once(source, args: argparse.Namespace, params) -> int:
    try:
        ans, img = answer(source, args.image, args.user_text, params, args.max_pixels)
    except TurnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    emit(ans, img, args)
    return 0
