"""Guided decoding: every answer is valid CoordJSON, even when the token budget runs out.

A token mask is applied at every decoding step, in the PyTorch reference (a transformers
`LogitsProcessor`) and on the ONNX path (a numpy `logits_hook` for `OnnxParts.generate`, used by the
in-process engine and by the Triton `llm` model). Both go through the same `GuidedBatch`, so the
masks are identical and greedy parity (torch == onnx == served) holds with guidance on.

    guided_logits_processor(processor, prompt, params, batch) -> transformers LogitsProcessor
    guided_logits_hook(processor, prompt, params, batch)      -> (step, generated, logits[B, V]) -> logits
    obj.extras() -> one dict per row: {"guided": True, "guided_closed_early": bool}
    GuidedBatch.forced_tokens(row, limit) / hook.forced_tokens(row, ids, limit) -> jump-forward runs

Three layers, each doing what the one before cannot:

1. The grammar (xgrammar, EBNF): the exact spelling `coordexp.prompt.format_coordjson` writes --
   `{"objects": [` objects joined by `, ` `]}`, each object `{"desc": "...", "bbox_2d": [...]}` or
   geometry first, `bbox_2d` with 4 coordinates or `poly` with an even number >= 6. Coordinates are
   `Token(<coord ids>)` in coord-token mode (exactly one of the 1000 coord tokens, never the text
   spelled out piece by piece) or integers 0..999 without leading zeros in numeric mode. `desc` is
   non-empty printable ASCII without `"`, `\\` and `<` (so no escapes and no special tokens inside
   a label), not starting or ending with a space (the parser would strip it: a repair).
   `<|im_end|>` is not in the grammar: the matcher allows the stop tokens only once the answer is
   complete. The fixed skeleton between the free parts (desc text, coordinates) is allowed in ONE
   tokenization only, the tokenizer's own: from a skeleton state the allowed tokens are the first
   tokens of `tokenizer.encode` of each way the skeleton can go on up to the next free part
   (`CoordJsonGuide.canon`), e.g. after `"desc` only `":`, after a bbox's 4th coordinate only
   `]},` or `]}]}`. That is what the model was trained on (the answers are `format_coordjson`
   text, tokenized), so a trained model picks those tokens anyway -- checked on all 50 demo val
   images: guided answers identical to the any-tokenization grammar and to unguided decoding --
   and it makes most of the skeleton forced (one token allowed), which jump-forward exploits. The
   cost: a desc starting with punctuation is written ` "` + `(` where the tokenizer would merge
   ` "(`; the any-tokenization grammar stays available as `get_guide(..., canonical=False)`.
2. Budget-aware closing (a small planner; xgrammar's `max_tokens` is only a soft limit). The
   grammar is regular, so a DFA over bytes (+ one symbol for "a coord token") mirrors it exactly.
   For every DFA state we precompute `cost[q]`: the fewest tokens that complete a valid answer
   (shortest path over the tokens that spell the skeleton, so the plan is always realisable).
   A token is allowed only if the cost of the state it leads to fits the tokens left after it.
   So a row whose budget would not fit another object closes the current one and the list, and
   ends as valid CoordJSON with fewer objects; `guided_closed_early` is set on that row when the
   planner removed the token the model ranked first among those the grammar allowed (the model
   wanted to go on). The check costs nothing while
   `tokens_left - 1 >= max(cost)` (all but the last ~20-40 steps).
3. No duplicates: the shared parser notes a repeated geometry as a repair, and untrained models
   love to repeat themselves, so a geometry identical to one already written in the answer is
   masked at the token that would complete it (the last bbox coordinate, or the `]` of a poly).
   Likewise no inverted box (the parser notes `x2 < x1` / `y2 < y1` too): x2 and y2 may not go
   below x1 and y1 (coord tokens masked by value; numeric: a number that cannot reach its bound
   within the budget). The one exception: a numeric answer the budget cuts (`guided_closed_early`)
   may keep an inverted box, as the planner's costs do not know a bound may need more digits.
   This order rule is for `bbox_format: xyxy` only: in a centre format (`cxcywh`,
   `cxcy_logw_logh`) the last two numbers are sizes, so nothing masks them against the first two.

Jump-forward (`GuidedBatch.forced_tokens`, used by `OnnxParts.generate` with `jump_forward`): after
the model's token, the tokens the mask allows alone (grammar, canonical skeleton, planner and
duplicate guard together) are appended at once and fed to the decoder with it as one chunk. Greedy
decoding would pick exactly these (every other logit is -inf), so greedy output is identical with
and without it; a run stops before a step where the planner narrowed the choice while
`guided_closed_early` is still unknown (that needs the model's logits), and ends the row when only
stop tokens are left. Measured on the demo val set (50 images, `coordexp.benchmarks.jump_forward`):
2.7x fewer decoder calls (batch 1 and batch 8); 62 % of the answers' tokens are forced (34 % with
the any-tokenization grammar, which would give only ~1.5x).

Where the budget cannot hold even `{"objects": []}` the planner keeps the cheapest tokens (the
answer is cut anyway; `guided_closed_early` is True). With `ignore_eos` (benchmarks) a row that is
complete is left unmasked from then on (the stop tokens are suppressed, nothing else would be left).

Needs `xgrammar` (pyproject extra `guided`); importing this module without it raises ImportError
with the install line.
"""
from __future__ import annotations

from coordexp.guided.batch import (GuidedBatch, GuidedLogitsHook, GuidedLogitsProcessor, guided_logits_hook,
                                   guided_logits_processor)
from coordexp.guided.grammar import grammar_ebnf
from coordexp.guided.guide import CoordJsonGuide, get_guide

__all__ = ["grammar_ebnf", "CoordJsonGuide", "GuidedBatch", "GuidedLogitsProcessor", "GuidedLogitsHook",
           "guided_logits_processor", "guided_logits_hook", "get_guide"]
