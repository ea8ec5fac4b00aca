"""ONNX Runtime engine: the three exported graphs (`export/onnx_export.py`) plus numpy host glue.

`OnnxParts` owns the sessions and the decode loop and is shared with the Triton Python models
(`coordexp.serving`); `OnnxEngine` wraps it with the processor into the same `generate_batch`
interface as the torch reference engine.

Decoding semantics follow transformers' `generate` as `TorchEngine` calls it (the token choice is
`coordexp.decoding.sampling`, shared by every decode loop):

- greedy output equals the torch reference token for token (the export is validated on exactly that);
- sampled draws come from a numpy `Generator` per row: they can NOT reproduce torch's RNG stream, so
  sampled text differs from the torch engine at the same seed; the promise is "same seed -> same
  output" within our engines;
- a row stops at its first stop token (not returned) or after `max_new_tokens`;
  `ignore_eos` suppresses the stop tokens instead (like `min_new_tokens = max_new_tokens`), so
  exactly `max_new_tokens` tokens come back;
- rows that finished are dropped from the batch (their KV cache rows are sliced away);
- `jump_forward` (guided decoding only): grammar-forced tokens are appended without a model
  choice and fed with the chosen token as one decoder chunk; greedy output is unchanged, sampled
  output differs from the step-by-step stream (forced tokens take no draw). See `generate`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from coordexp.decoding.blocks import chunk_block, left_pad, trimmed_start
from coordexp.engines.base import results_from_ids
from coordexp.generation import EngineDefaults, GenerationParams, GenerationResult, RequestPrompt
from coordexp.prompt import PromptSpec

META_NAME = "onnx_meta.json"
LogitsHook = Callable[[int, list, np.ndarray], np.ndarray]


def find_onnx_dir(path: str | os.PathLike, max_depth: int = 3) -> Path:
    """The folder holding `onnx_meta.json`: `path` itself or the first (sorted) folder below it,
    up to `max_depth` levels (a model repository puts the graphs in a subfolder)."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"ONNX export folder not found: {path}")
    if (root / META_NAME).is_file():
        return root
    if root.is_dir():
        level = [root]
        for _ in range(max_depth):
            nxt = []
            for d in level:
                try:
                    subs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
                except OSError:
                    continue
                for s in subs:
                    if (s / META_NAME).is_file():
                        return s
                nxt += subs
            level = nxt
    if (root / "config.json").is_file():
        raise FileNotFoundError(f"{path} is a Hugging Face checkpoint, not an ONNX export; make one with "
                                f"`python export/build_engine.py --ckpt {path}`")
    raise FileNotFoundError(f"no {META_NAME} in {path} or its subfolders: not an ONNX export / model repository")


def encode_image_groups(session: Any, feeds_of: Callable[[np.ndarray, np.ndarray], tuple[dict, Any]],
                        pixel_values: np.ndarray, image_grid_thw: np.ndarray, max_patches: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Images through a vision graph (an onnxruntime session or anything with its `get_outputs()` /
    `run(names, feeds)`) in groups of at most `max_patches` patches: `(image_embeds, deepstack)`,
    float32, all images concatenated in order. `feeds_of(pixel_values, grid)` makes a group's inputs."""
    from coordexp import mrope

    grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    pixel_values = np.asarray(pixel_values)
    counts = mrope.num_patches(grid)
    if int(counts.sum()) != pixel_values.shape[0]:
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches, image_grid_thw says {int(counts.sum())}")
    starts = np.concatenate([[0], np.cumsum(counts)])
    outputs = [o.name for o in session.get_outputs()]
    embeds, deeps = [], []
    i = 0
    while i < len(grid):
        j = i + 1
        while j < len(grid) and starts[j + 1] - starts[i] <= max_patches:
            j += 1
        feeds, order = feeds_of(pixel_values[starts[i]:starts[j]], grid[i:j])
        res = dict(zip(outputs, session.run(outputs, feeds)))
        e = res["image_embeds"].astype(np.float32, copy=False)
        d = res.get("deepstack")
        if d is None:
            d = np.zeros((0, e.shape[0], e.shape[1]), dtype=np.float32)
        if order is not None:
            e, d = e[order], d[:, order]
        embeds.append(e)
        deeps.append(d.astype(np.float32, copy=False))
        i = j
    return np.concatenate(embeds, axis=0), np.concatenate(deeps, axis=1)


class OnnxParts:
    """The three graphs + host-side glue (M-RoPE positions, vision inputs, KV-cache decode loop).

    `threads`: ONNX Runtime intra-op threads (None: its default). `providers`: execution providers
    (default CUDA when available, then CPU). `max_vision_patches`: images are run through the
    vision graph in groups of at most this many patches. `preload`: graphs to open now ("vision",
    "embed", "decoder"); the others open on first use. `prefix_cache`: see `prefill`; `jump_forward`:
    see `generate`.
    """

    def __init__(self, onnx_dir: str | os.PathLike, threads: int | None = None,
                 providers: Sequence[str] | None = None, max_vision_patches: int = 1024,
                 preload: Sequence[str] = (), prefix_cache: bool = False, jump_forward: bool = False):
        import onnxruntime as ort

        self.onnx_dir = find_onnx_dir(onnx_dir)
        self.meta: dict[str, Any] = json.loads((self.onnx_dir / META_NAME).read_text(encoding="utf-8"))
        m = self.meta
        self.family = str(m.get("family", "qwen3_vl"))
        self.hidden = int(m["hidden_size"])
        self.num_layers = int(m["num_layers"])
        self.kv_heads = int(m["num_kv_heads"])
        self.head_dim = int(m["head_dim"])
        self.num_deepstack = int(m["num_deepstack"])
        self.merge = int(m["spatial_merge_size"])
        self.image_token_id = int(m["image_token_id"])
        self.video_token_id = int(m.get("video_token_id", -1))
        self.stop_ids = [int(i) for i in m["stop_token_ids"]]
        self.pad_token_id = int(m["pad_token_id"])
        self.max_vision_patches = int(max_vision_patches)
        self.prefix_cache = bool(prefix_cache)  # the shared prompt prefix's KV computed once (see `prefill`)
        self.jump_forward = bool(jump_forward)  # guided: grammar-forced tokens fed as one chunk (see `generate`)
        self.decoder_calls = 0  # decoder graph runs so far (benchmarks)
        self.np_dtype = np.float16 if m.get("dtype") == "float16" else np.float32
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._session_options = opts
        avail = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in avail]
        self.providers = list(providers)
        for key in ("vision", "embed", "decoder"):
            path = self.onnx_dir / m["graphs"][key]["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing (listed in {META_NAME})")
        # Sessions open on first use: a process serving only the vision tower never loads the decoder.
        self.sessions: dict[str, Any] = {}
        for key in preload:
            self.session(key)

    def session(self, key: str):
        """The onnxruntime InferenceSession of graph `key` ("vision", "embed" or "decoder")."""
        sess = self.sessions.get(key)
        if sess is None:
            import onnxruntime as ort

            path = self.onnx_dir / self.meta["graphs"][key]["file"]
            sess = ort.InferenceSession(str(path), sess_options=self._session_options, providers=self.providers)
            self.sessions[key] = sess
        return sess

    @property
    def vision_session(self):
        return self.session("vision")

    @property
    def embed_session(self):
        return self.session("embed")

    @property
    def decoder_session(self):
        return self.session("decoder")

    @property
    def decoder_outputs(self) -> list[str]:
        return [o.name for o in self.decoder_session.get_outputs()]

    # -------------------------------------------------------------------------------- vision
    def vision_feeds(self, pixel_values: np.ndarray, image_grid_thw: np.ndarray
                     ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """vision.onnx inputs for these images (all in one attention call, block-diagonal bias) and,
        for Qwen2.5-VL, the row order that undoes the window permutation of the output (else None):
        the family's `coordexp.families.FamilySpec.vision_feeds`."""
        from coordexp.families import family_spec

        return family_spec(self.family).vision_feeds(self.meta, pixel_values, image_grid_thw, self.np_dtype)

    def encode_images(self, pixel_values: np.ndarray, image_grid_thw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`(image_embeds [n_image_tokens, H], deepstack [n_deepstack, n_image_tokens, H])`, float32,
        for all images concatenated in order (Qwen2.5-VL: `n_deepstack` = 0). Images are run in
        groups of at most `max_vision_patches` patches (a single bigger image runs alone)."""
        return encode_image_groups(self.vision_session, self.vision_feeds, pixel_values, image_grid_thw,
                                   self.max_vision_patches)

    # ---------------------------------------------------------------------------------- text
    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        return self.embed_session.run(["inputs_embeds"], {"input_ids": np.asarray(input_ids, dtype=np.int64)})[0]

    def prefill_feeds(self, input_ids: np.ndarray, attention_mask: np.ndarray, image_grid_thw: np.ndarray,
                      image_embeds: np.ndarray, deepstack: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """decoder.onnx inputs for the prompt (empty cache) and the M-RoPE deltas `[B, 1]`."""
        from coordexp import mrope

        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        bsz = input_ids.shape[0]
        embeds, dense = self.prompt_embeds(input_ids, image_embeds, deepstack)
        pos, deltas = mrope.get_rope_index(input_ids, image_grid_thw, attention_mask,
                                           spatial_merge_size=self.merge, image_token_id=self.image_token_id,
                                           video_token_id=self.video_token_id)
        feeds = {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": pos}
        if self.num_deepstack:
            feeds["deepstack"] = dense
        empty = np.zeros((bsz, self.kv_heads, 0, self.head_dim), dtype=self.np_dtype)
        for i in range(self.num_layers):
            feeds[f"past_key_{i}"] = empty
            feeds[f"past_value_{i}"] = empty
        return feeds, deltas

    def prompt_embeds(self, input_ids: np.ndarray, image_embeds: np.ndarray, deepstack: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray | None]:
        """Prompt ids [B, T] -> (inputs_embeds with the image features on the image tokens, the dense
        deepstack input [L, B, T, H] (zero off the image tokens), or None without deepstack)."""
        bsz, seq = input_ids.shape
        embeds = np.array(self.embed(input_ids), dtype=self.np_dtype)
        img = input_ids == self.image_token_id
        n_img = int(img.sum())
        if n_img != image_embeds.shape[0]:
            raise ValueError(f"{n_img} image tokens in input_ids but {image_embeds.shape[0]} image embeddings")
        embeds[img] = image_embeds.astype(self.np_dtype, copy=False)
        if not self.num_deepstack:
            return embeds, None
        dense = np.zeros((self.num_deepstack, bsz, seq, self.hidden), dtype=self.np_dtype)
        dense[:, img] = deepstack.astype(self.np_dtype, copy=False)
        return embeds, dense

    def decoder_step(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder call: (`logits [B, V]` float32, presents [k0, v0, k1, v1, ...])."""
        self.decoder_calls += 1
        outs = self.decoder_session.run(self.decoder_outputs, feeds)
        return outs[0].astype(np.float32, copy=False), outs[1:]

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, image_grid_thw: np.ndarray,
                image_embeds: np.ndarray, deepstack: np.ndarray
                ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray]:
        """The prompt through the decoder: `(logits [B, V], presents, attention_mask [B, P], deltas [B, 1])`,
        `attention_mask` covering every cached position (what the next step extends). With
        `prefix_cache` on, the shared prompt prefix comes from `coordexp.engines.prefix_cache`."""
        if self.prefix_cache:
            from coordexp.engines.prefix_cache import cached_prefill

            return cached_prefill(self, input_ids, attention_mask, image_grid_thw, image_embeds, deepstack)
        feeds, deltas = self.prefill_feeds(input_ids, attention_mask, image_grid_thw, image_embeds, deepstack)
        logits, presents = self.decoder_step(feeds)
        return logits, presents, np.asarray(attention_mask, dtype=np.int64), deltas

    def prefill_logits(self, input_ids, attention_mask, image_grid_thw, image_embeds, deepstack) -> np.ndarray:
        """Logits of the first generated position `[B, V]` (validation)."""
        feeds, _ = self.prefill_feeds(input_ids, attention_mask, image_grid_thw, image_embeds, deepstack)
        return self.decoder_step(feeds)[0]

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, image_grid_thw: np.ndarray,
                 image_embeds: np.ndarray, deepstack: np.ndarray, params: GenerationParams,
                 logits_hook: LogitsHook | None = None,
                 on_step: Callable[[list[list[int]], list[int]], None] | None = None) -> list[list[int]]:
        """Generated ids per row (stop token excluded) for a LEFT padded batch `[B, T]`.

        `logits_hook(step, generated, logits)`: called at every step before sampling with
        `generated` (list of B lists, the ids so far) and `logits [B, V]` float32 (after the
        repetition penalty / stop suppression); returns the logits to use (e.g. -inf masks for
        guided decoding). Rows that already finished get zero logits there and their returned
        values are ignored.

        `on_step(generated, finished)`: called after every step (token streaming) with the ids so
        far and the rows that finished at this step (stop token or length limit); every row is
        reported finished exactly once.

        Jump-forward (`self.jump_forward`, with a hook that has `forced_tokens(row, ids, limit)`,
        i.e. guided decoding): after a row's token is chosen, the tokens the grammar forces next are
        appended at once and the row feeds [token, forced...] to the decoder as one chunk, so one
        decoder call covers them all. Rows of one batch with shorter chunks are padded at the front
        of the block with attention_mask 0 (the decoder returns the last position's logits), and
        positions go on per row, so the cache holds the same keys as step-by-step decoding. The hook
        is then called with `active=` (the rows still running). Greedy output is the same as
        without it: a forced token is the only one with a finite logit, which argmax picks. Forced
        tokens take no sampling draw, so sampled output differs from the step-by-step stream at the
        same seed (it is still reproducible). `on_step` reports the jumped ids with the token that
        led to them; stop / length / `ignore_eos` / repetition-penalty semantics are unchanged (a
        forced run ends at the length limit, and one that only allows stop tokens ends the row).
        """
        from coordexp.decoding.loop import decode_batch

        return decode_batch(OnnxRows(self, self.pad_token_id, trim=False), self.stop_ids, input_ids, attention_mask,
                            image_grid_thw, image_embeds, deepstack, params, logits_hook, on_step)

    def step_feeds(self, ids: np.ndarray, new_mask: np.ndarray, pos: np.ndarray, mask: np.ndarray,
                   presents: list[np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Decoder inputs for new text ids over a KV cache (every decode loop's step): `ids`,
        `new_mask`, `pos` [n, width] (text positions, the same on all three M-RoPE rows), `mask`
        [n, P] the cache's; (feeds, the mask extended by `new_mask`)."""
        n, width = ids.shape
        mask = np.concatenate([mask, new_mask], axis=1)
        feeds = {
            "inputs_embeds": np.asarray(self.embed(ids), dtype=self.np_dtype),
            "attention_mask": mask,
            "position_ids": np.ascontiguousarray(np.broadcast_to(pos[None], (3, n, width))),
        }
        if self.num_deepstack:
            feeds["deepstack"] = np.zeros((self.num_deepstack, n, width, self.hidden), dtype=self.np_dtype)
        for i in range(self.num_layers):
            feeds[f"past_key_{i}"] = presents[2 * i]
            feeds[f"past_value_{i}"] = presents[2 * i + 1]
        return feeds, mask

    def describe(self) -> dict[str, Any]:
        m = self.meta
        return {"onnx_dir": str(self.onnx_dir.resolve()), "checkpoint": m.get("checkpoint"),
                "checkpoint_sha256": m.get("checkpoint_sha256"), "opset": m.get("opset"), "dtype": m.get("dtype"),
                "providers": self.providers, "exported_with": m.get("versions")}


class OnnxRows:
    """`DecodeRows` (`coordexp.decoding.loop`) on `OnnxParts`: one left-padded KV cache for the batch
    (past lengths differ per row; the padding has attention_mask 0). `trim`: cut the padding columns
    no row needs once the longest rows left (in flight); a static batch keeps its columns, so its
    attention shapes are those of the batch as it started."""

    def __init__(self, parts: "OnnxParts", pad_token_id: int, trim: bool = True):
        self.parts = parts
        self.pad_token_id = int(pad_token_id)
        self.trim = trim
        self.presents: list[np.ndarray] = []  # [k0, v0, k1, v1, ...], each [B, kv_heads, P, head_dim]
        self.mask = np.zeros((0, 0), dtype=np.int64)  # [B, P]
        self.base = np.zeros(0, dtype=np.int64)  # prompt_len + M-RoPE delta per row
        self.steps = np.zeros(0, dtype=np.int64)  # tokens fed per row since its prefill

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    def admit(self, input_ids: np.ndarray, prompt_mask: np.ndarray, grid: np.ndarray, embeds: np.ndarray,
              deep: np.ndarray) -> np.ndarray:
        prompt_mask = np.asarray(prompt_mask, dtype=np.int64)
        logits, presents, mask, deltas = self.parts.prefill(input_ids, prompt_mask, grid, embeds, deep)
        mask = np.asarray(mask, dtype=np.int64)
        base = prompt_mask.sum(-1).astype(np.int64) + np.asarray(deltas, dtype=np.int64).reshape(-1)
        if not len(self):
            self.presents, self.mask = list(presents), mask
        else:
            length = max(self.mask.shape[1], mask.shape[1])
            self.presents = [np.concatenate([left_pad(old, length, 2), left_pad(new, length, 2)], axis=0)
                             for old, new in zip(self.presents, presents)]
            self.mask = np.concatenate([left_pad(self.mask, length, 1), left_pad(mask, length, 1)], axis=0)
        self.base = np.concatenate([self.base, base])
        self.steps = np.concatenate([self.steps, np.zeros(len(base), dtype=np.int64)])
        return np.asarray(logits, dtype=np.float32)

    @property
    def jump_forward(self) -> bool:
        return self.parts.jump_forward

    def step(self, chunks: Sequence[Sequence[int]]) -> np.ndarray:
        ids, new_mask, pos = chunk_block(chunks, self.base + self.steps, self.pad_token_id)
        feeds, mask = self.parts.step_feeds(ids, new_mask, pos, self.mask, self.presents)
        logits, presents = self.parts.decoder_step(feeds)
        self.presents, self.mask = list(presents), mask
        self.steps = self.steps + np.asarray([len(c) for c in chunks], dtype=np.int64)
        return logits

    def keep(self, positions: Sequence[int]) -> None:
        sel = np.asarray(positions, dtype=np.int64)
        if len(sel) == len(self):
            return
        self.mask, self.base, self.steps = self.mask[sel], self.base[sel], self.steps[sel]
        start = trimmed_start(self.mask) if self.trim else 0  # padding columns no remaining row needs
        if start:
            self.mask = np.ascontiguousarray(self.mask[:, start:])
            self.presents = [np.ascontiguousarray(t[sel][:, :, start:]) for t in self.presents]
        else:
            self.presents = [t[sel] for t in self.presents]



class OnnxEngine(EngineDefaults):
    """The `Engine` interface on ONNX Runtime, in process (see the module docstring for semantics)."""

    name = "onnx"

    def __init__(self, path: str | os.PathLike, prompt: PromptSpec | None = None, threads: int | None = None,
                 providers: Sequence[str] | None = None, jump_forward: bool = False, prefix_cache: bool = False,
                 image_max_pixels: int | None = None):
        from coordexp.processor import CoordExpProcessor

        self.path = str(path)
        self.parts = OnnxParts(path, threads=threads, providers=providers, jump_forward=jump_forward,
                               prefix_cache=prefix_cache)
        self.onnx_dir = self.parts.onnx_dir
        self.processor = CoordExpProcessor.from_pretrained(str(self.onnx_dir), image_max_pixels=image_max_pixels)
        self.prompt = prompt or PromptSpec()
        self.threads = threads

    def describe(self) -> dict[str, Any]:
        import onnxruntime

        return {"engine": self.name, "path": os.path.abspath(self.path), **self.parts.describe(),
                "onnxruntime": onnxruntime.__version__, "threads": self.threads}

    def checkpoint_sha256(self) -> str | None:
        return self.parts.meta.get("checkpoint_sha256")

    def _hook(self, params: GenerationParams, batch: int, prompt: PromptSpec) -> LogitsHook | None:
        self.guided = None
        if not params.guided:
            return None
        try:
            from coordexp.guided import guided_logits_hook  # numpy hook: (step, generated, logits) -> logits
        except ImportError as e:
            raise ValueError("guided decoding with the onnx engine needs coordexp.guided.guided_logits_hook "
                             f"(not available: {e})") from e
        self.guided = guided_logits_hook(self.processor, prompt, params, batch=batch)
        return self.guided

    def generate_ids(self, images: Sequence[Any], params: GenerationParams, prompt: RequestPrompt | None = None
                     ) -> tuple[list[list[int]], int]:
        spec = prompt.apply(self.prompt) if prompt is not None else self.prompt
        enc = self.processor.encode(list(images), spec, return_tensors="np")
        embeds, deep = self.parts.encode_images(enc["pixel_values"], enc["image_grid_thw"])
        rows = self.parts.generate(enc["input_ids"], enc["attention_mask"], enc["image_grid_thw"], embeds, deep,
                                   params, logits_hook=self._hook(params, len(images), spec))
        return rows, int(enc["input_ids"].shape[1])

    def generate_batch(self, images: Sequence[Any], params: GenerationParams, prompt: RequestPrompt | None = None
                       ) -> list[GenerationResult]:
        rows, prompt_len = self.generate_ids(images, params, prompt)
        return results_from_ids(self.processor, rows, prompt_len, params, self.guided)
