"""The demo training's data and loss: fresh synthetic batches per step, the causal-LM loss, the schedule.

The batch of step s depends only on (seed, s) (`draw_batch`), so batches can be built inline or by
worker processes with the same result.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

from coordexp.prompt import PromptSpec, format_coordjson

TRAIN_SPLIT = "train-demo"  # the seed stream of the training batches (val uses split "val")


def make_batch(processor, spec: PromptSpec, images: Sequence[Any], objects: Sequence[Sequence[dict]]):
    """Training inputs: `processor.encode(images, spec)` (the inference prompt, left padded) followed by
    the answer tokens and `<|im_end|>`, right padded. `labels` are -100 except on answer + im_end."""
    import torch

    enc = processor.encode(list(images), spec)
    tok = processor.tokenizer
    answers = [format_coordjson(objs, spec) for objs in objects]
    ans_ids = [tok(a, add_special_tokens=False)["input_ids"] + [processor.im_end_token_id] for a in answers]
    n, p = enc["input_ids"].shape
    a = max(len(x) for x in ans_ids)
    input_ids = torch.full((n, p + a), processor.pad_token_id, dtype=torch.long)
    attention = torch.zeros((n, p + a), dtype=torch.long)
    labels = torch.full((n, p + a), -100, dtype=torch.long)
    input_ids[:, :p] = enc["input_ids"]
    attention[:, :p] = enc["attention_mask"]
    for i, ids in enumerate(ans_ids):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[i, p:p + len(ids)] = t
        attention[i, p:p + len(ids)] = 1
        labels[i, p:p + len(ids)] = t
    mm = torch.zeros_like(input_ids)
    mm[:, :p] = enc["mm_token_type_ids"]
    return {"input_ids": input_ids, "attention_mask": attention, "mm_token_type_ids": mm,
            "pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"], "labels": labels}


def draw_batch(seed: int, step: int, batch_size: int, image_size: int):
    from coordexp.fixtures.synthetic import record_rng, sample

    rng = record_rng(seed, TRAIN_SPLIT, step)
    images, objects = [], []
    for _ in range(batch_size):
        im, objs = sample(rng, image_size)
        images.append(im)
        objects.append(objs)
    return images, objects


class StepBatches:
    """Map-style dataset of training batches by step number, so a DataLoader's worker processes can
    build them ahead of the accelerator (the batch depends only on (seed, step): same data either way)."""

    def __init__(self, processor, spec: PromptSpec, seed: int, start: int, stop: int, batch_size: int,
                 image_size: int):
        self.processor, self.spec, self.seed = processor, spec, seed
        self.start, self.stop, self.batch_size, self.image_size = start, stop, batch_size, image_size

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __getitem__(self, i: int):
        images, objects = draw_batch(self.seed, self.start + i, self.batch_size, self.image_size)
        return make_batch(self.processor, self.spec, images, objects)


def batches(processor, spec: PromptSpec, args, start: int, stop: int):
    """Batches for steps start..stop-1 in order: built inline (`--workers 0`) or by worker processes."""
    data = StepBatches(processor, spec, args.seed, start, stop, args.batch_size, args.image_size)
    if args.workers <= 0:
        return (data[i] for i in range(len(data)))
    import torch

    return iter(torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=args.workers,
                                            prefetch_factor=4, persistent_workers=False))


def prefix_length(batch) -> int:
    """Length of the prompt prefix shared by every row (the tokens before the first image token), or 0
    when the rows differ there (padding, different prompts)."""
    ids, mask, mm = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
    first = (mm[0] != 0).nonzero()
    if first.numel() == 0:
        return 0
    p = int(first[0])
    if not bool((ids[:, :p] == ids[:1, :p]).all()) or not bool(mask[:, :p].all()):
        return 0
    return p


def causal_lm_loss(model, batch, shared_prefix: bool = True):
    """The standard causal-LM loss (mean cross-entropy over the tokens whose label is not -100).

    With `shared_prefix`, the prompt prefix that every row shares (system prompt up to the image) runs
    once with batch 1 and its keys/values are broadcast to the batch: with causal attention this gives
    the same loss and gradients as `model(**batch).loss` at about half the text compute (the prompt is
    longer than image + answer). Logits are computed only where a label follows."""
    import torch.nn.functional as F
    from transformers import DynamicCache

    labels = batch["labels"]
    p = prefix_length(batch) if shared_prefix else 0
    if p == 0:
        return model(**batch).loss
    inner = model.model
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos, _ = inner.get_rope_index(ids, batch["mm_token_type_ids"], batch["image_grid_thw"], attention_mask=mask)
    cache = DynamicCache(config=model.config)
    inner.language_model(input_ids=ids[:1, :p], attention_mask=mask[:1, :p], position_ids=pos[:, :1, :p],
                         past_key_values=cache)
    b = ids.shape[0]
    for layer in cache.layers:
        layer.keys = layer.keys.expand(b, -1, -1, -1)
        layer.values = layer.values.expand(b, -1, -1, -1)
    out = inner(input_ids=ids[:, p:], attention_mask=mask, position_ids=pos[:, :, p:], past_key_values=cache,
                pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                mm_token_type_ids=batch["mm_token_type_ids"][:, p:])
    hidden = out.last_hidden_state  # (b, L - p, H)
    lab = labels[:, p:]
    first = int((lab != -100).any(0).nonzero()[0])  # first labelled column
    h = hidden[:, first - 1:-1]
    tgt = lab[:, first:]
    logits = model.lm_head(h).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)


# ------------------------------------------------------------------------------------------------ schedule

def lr_factor(step: int, warmup: int, progress: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to 0 over `progress` in [0, 1]."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
