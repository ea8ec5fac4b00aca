"""The one model-text parser: coordexp.parser.parse_model_output and `coordexp-client parse`."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from coordexp.parser import ParseResult, parse_model_output, replace_coord_tokens, strip_special
from coordexp.prompt import PromptSpec, format_coordjson
from coordexp.schema import ErrorCode, PredObject

E = ErrorCode


def B(points, desc):
    return PredObject(type="bbox_2d", points=list(points), desc=desc, score=1.0)


def P(points, desc):
    return PredObject(type="poly", points=list(points), desc=desc, score=1.0)


def T(*ks):
    """Coord tokens as the model writes them: '<|coord_1|>, <|coord_2|>, ...'."""
    return ", ".join(f"<|coord_{k}|>" for k in ks)


CAT = B([110, 310, 410, 705], "black cat")
CAT_TOK = '{"desc": "black cat", "bbox_2d": [' + T(110, 310, 410, 705) + "]}"
CAT_NUM = '{"desc": "black cat", "bbox_2d": [110, 310, 410, 705]}'

# (id, text, coord_mode, expected preds, expected error, expected num_dropped)
CASES = [
    # --- both coordinate formats, both key orders, both wrappers ------------------------------
    ("tokens-desc-first", '{"objects": [' + CAT_TOK + "]}", "norm1000", [CAT], None, 0),
    ("tokens-geometry-first", '{"objects": [{"bbox_2d": [' + T(110, 310, 410, 705) + '], "desc": "black cat"}]}',
     "norm1000", [CAT], None, 0),
    ("numeric-desc-first", '{"objects": [' + CAT_NUM + "]}", "norm1000", [CAT], None, 0),
    ("numeric-geometry-first", '{"objects": [{"bbox_2d": [110, 310, 410, 705], "desc": "black cat"}]}',
     "norm1000", [CAT], None, 0),
    ("bare-list-numeric", "[" + CAT_NUM + "]", "norm1000", [CAT], None, 0),
    ("bare-list-tokens", "[" + CAT_TOK + "]", "norm1000", [CAT], None, 0),
    ("bare-single-object", CAT_NUM, "norm1000", [CAT], None, 0),
    ("label-alias", '{"objects": [{"label": "black cat", "bbox_2d": [110, 310, 410, 705]}]}', "norm1000",
     [CAT], None, 0),
    ("desc-wins-over-label", '{"objects": [{"label": "x", "desc": "black cat", "bbox_2d": [110, 310, 410, 705]}]}',
     "norm1000", [CAT], None, 0),
    ("quoted-coord-tokens", '{"objects": [{"desc": "black cat", "bbox_2d": ["<|coord_110|>", "<|coord_310|>", '
     '"<|coord_410|>", "<|coord_705|>"]}]}', "norm1000", [CAT], None, 0),
    ("im-end-after", '{"objects": [' + CAT_TOK + "]}<|im_end|>", "norm1000", [CAT], None, 0),
    ("poly-tokens", '{"objects": [{"desc": "roof", "poly": [' + T(1, 2, 30, 2, 30, 40, 1, 40) + "]}]}",
     "norm1000", [P([1, 2, 30, 2, 30, 40, 1, 40], "roof")], None, 0),
    ("poly-point-pairs", '{"objects": [{"desc": "roof", "poly": [[1, 2], [30, 2], [30, 40]]}]}', "norm1000",
     [P([1, 2, 30, 2, 30, 40], "roof")], None, 0),
    # --- wrappers around the JSON --------------------------------------------------------------
    ("fence-json", '```json\n{"objects": [' + CAT_TOK + "]}\n```", "norm1000", [CAT], None, 0),
    ("fence-plain", '```\n[' + CAT_NUM + "]\n```", "norm1000", [CAT], None, 0),
    ("prose-around", 'Here are the objects I found [1]:\n{"objects": [' + CAT_NUM + "]}\nHope this helps!",
     "norm1000", [CAT], None, 0),
    ("prose-with-braces-before-list", "Sure {ok}: [" + CAT_NUM + "]", "norm1000", [CAT], None, 0),
    ("think-block", '<think>maybe {"objects": []}?</think>{"objects": [' + CAT_TOK + "]}", "norm1000",
     [CAT], None, 0),
    # --- syntax repairs -----------------------------------------------------------------------
    ("single-quotes", "{'objects': [{'desc': 'black cat', 'bbox_2d': [110, 310, 410, 705]}]}", "norm1000",
     [CAT], None, 0),
    ("single-quotes-apostrophe", "{'objects': [{'desc': 'cat's toy', 'bbox_2d': [1, 2, 3, 4]}]}", "norm1000",
     [B([1, 2, 3, 4], "cat's toy")], None, 0),
    ("apostrophe-in-double-quotes", '{"objects": [{"desc": "cat\'s toy", "bbox_2d": [1, 2, 3, 4]}]}', "norm1000",
     [B([1, 2, 3, 4], "cat's toy")], None, 0),
    ("trailing-commas", '{"objects": [{"desc": "black cat", "bbox_2d": [' + T(110, 310, 410, 705) + ",],},],}",
     "norm1000", [CAT], None, 0),
    ("missing-closing-list-and-root", '{"objects": [' + CAT_TOK, "norm1000", [CAT], None, 0),
    ("missing-object-brace-midtext", '{"objects": [{"desc": "black cat", "bbox_2d": [110, 310, 410, 705]]}',
     "norm1000", [CAT], None, 0),
    # issue 14: a last record missing only its '}' is dropped, as upstream's test pins (it was kept)
    ("missing-all-closers-after-box", '{"objects": [{"desc": "black cat", "bbox_2d": [' + T(110, 310, 410, 705)
     + "]", "norm1000", [], E.EMPTY_PRED, 1),
    ("missing-last-brace-after-good-one", '{"objects": [' + CAT_NUM + ', {"desc": "dog", "bbox_2d": [1, 2, 3, 4]',
     "norm1000", [CAT], None, 1),
    ("bare-object-missing-brace", '{"desc": "black cat", "bbox_2d": [110, 310, 410, 705]', "norm1000",
     [], E.EMPTY_PRED, 1),
    ("missing-comma-between-objects", "[" + CAT_NUM + " " + CAT_NUM.replace("black cat", "dog") + "]", "norm1000",
     [CAT, B([110, 310, 410, 705], "dog")], None, 0),
    ("unquoted-keys", "{objects: [{desc: \"black cat\", bbox_2d: [110, 310, 410, 705]}]}", "norm1000",
     [CAT], None, 0),
    # --- truncation ---------------------------------------------------------------------------
    ("cut-mid-bbox-tokens", '{"objects": [{"desc": "cat", "bbox_2d": [<|coord_1|>, <|coord_2|>', "norm1000",
     [], E.EMPTY_PRED, 1),
    ("cut-mid-bbox-numeric", '{"objects": [{"desc": "cat", "bbox_2d": [1, 2, 3, 4', "norm1000",
     [], E.EMPTY_PRED, 1),
    ("cut-mid-coord-token", '{"objects": [{"desc": "cat", "bbox_2d": [<|coord_1|>, <|coord_2|>, <|coord_3|>, '
     "<|coo", "norm1000", [], E.EMPTY_PRED, 1),
    ("cut-second-object-mid-desc", '{"objects": [' + CAT_TOK + ', {"desc": "do', "norm1000", [CAT], None, 1),
    ("cut-second-object-mid-box", '{"objects": [' + CAT_TOK + ', {"desc": "dog", "bbox_2d": [' + T(5, 6, 7),
     "norm1000", [CAT], None, 1),
    ("cut-after-comma", '{"objects": [' + CAT_TOK + ",", "norm1000", [CAT], None, 0),
    ("cut-geometry-first-before-desc", '{"objects": [' + CAT_NUM + ', {"bbox_2d": [1, 2, 3, 4]', "norm1000",
     [CAT], None, 1),
    ("cut-before-any-object", '{"objects": [', "norm1000", [], E.EMPTY_PRED, 0),
    ("cut-in-key", '{"obje', "norm1000", [], E.EMPTY_PRED, 0),
    ("empty-list-missing-brace", '{"objects": []', "norm1000", [], None, 0),
    # --- coordinate validation ----------------------------------------------------------------
    ("above-999", '{"objects": [{"desc": "cat", "bbox_2d": [1, 2, 3, 1204]}]}', "norm1000",
     [], E.INVALID_COORD, 1),
    ("coord-token-above-999", '{"objects": [{"desc": "cat", "bbox_2d": [' + T(1, 2, 3, 1204) + "]}]}", "norm1000",
     [], E.INVALID_COORD, 1),
    ("999-ok", '{"objects": [{"desc": "cat", "bbox_2d": [0, 0, 999, 999]}]}', "norm1000",
     [B([0, 0, 999, 999], "cat")], None, 0),
    ("negative", '{"objects": [{"desc": "cat", "bbox_2d": [-1, 2, 3, 4]}]}', "norm1000", [], E.INVALID_COORD, 1),
    ("float", '{"objects": [{"desc": "cat", "bbox_2d": [1.5, 2, 3, 4]}]}', "norm1000", [], E.INVALID_COORD, 1),
    ("integral-float-accepted", '{"objects": [{"desc": "cat", "bbox_2d": [1.0, 2, 3, 4]}]}', "norm1000",
     [B([1, 2, 3, 4], "cat")], None, 0),
    ("bool-coord", '{"objects": [{"desc": "cat", "bbox_2d": [true, 2, 3, 4]}]}', "norm1000",
     [], E.INVALID_COORD, 1),
    ("string-coord", '{"objects": [{"desc": "cat", "bbox_2d": ["x1", 2, 3, 4]}]}', "norm1000",
     [], E.INVALID_COORD, 1),
    ("rel1000-1000-ok", '{"objects": [{"desc": "cat", "bbox_2d": [0, 0, 1000, 1000]}]}', "qwen3_rel1000",
     [B([0, 0, 1000, 1000], "cat")], None, 0),
    ("rel1000-1001", '{"objects": [{"desc": "cat", "bbox_2d": [0, 0, 1001, 1000]}]}', "qwen3_rel1000",
     [], E.INVALID_COORD, 1),
    ("pixel-large-ok", '{"objects": [{"desc": "cat", "bbox_2d": [10, 20, 4000, 3000]}]}', "pixel",
     [B([10, 20, 4000, 3000], "cat")], None, 0),
    ("pixel-negative", '{"objects": [{"desc": "cat", "bbox_2d": [-10, 20, 4000, 3000]}]}', "pixel",
     [], E.INVALID_COORD, 1),
    # --- geometry validation ------------------------------------------------------------------
    ("bbox-arity-3", '{"objects": [{"desc": "cat", "bbox_2d": [1, 2, 3]}]}', "norm1000", [], E.INVALID_GEOMETRY, 1),
    ("bbox-arity-5", '{"objects": [{"desc": "cat", "bbox_2d": [1, 2, 3, 4, 5]}]}', "norm1000",
     [], E.INVALID_GEOMETRY, 1),
    ("poly-odd", '{"objects": [{"desc": "roof", "poly": [1, 2, 3, 4, 5, 6, 7]}]}', "norm1000",
     [], E.INVALID_GEOMETRY, 1),
    ("poly-short", '{"objects": [{"desc": "roof", "poly": [1, 2, 3, 4]}]}', "norm1000", [], E.INVALID_GEOMETRY, 1),
    ("line-geometry", '{"objects": [{"desc": "wire", "line": [1, 2, 3, 4]}]}', "norm1000", [], E.INVALID_GEOMETRY, 1),
    ("bbox-key", '{"objects": [{"desc": "cat", "bbox": [1, 2, 3, 4]}]}', "norm1000", [], E.INVALID_GEOMETRY, 1),
    ("polygon-key", '{"objects": [{"desc": "roof", "polygon": [1, 2, 3, 4, 5, 6]}]}', "norm1000",
     [], E.INVALID_GEOMETRY, 1),
    ("two-geometries", '{"objects": [{"desc": "cat", "bbox_2d": [1, 2, 3, 4], "poly": [1, 2, 3, 4, 5, 6]}]}',
     "norm1000", [], E.INVALID_GEOMETRY, 1),
    ("no-geometry", '{"objects": [{"desc": "cat"}]}', "norm1000", [], E.INVALID_GEOMETRY, 1),
    ("geometry-not-list", '{"objects": [{"desc": "cat", "bbox_2d": 5}]}', "norm1000", [], E.INVALID_GEOMETRY, 1),
    # --- desc validation ----------------------------------------------------------------------
    ("empty-desc", '{"objects": [{"desc": "", "bbox_2d": [1, 2, 3, 4]}]}', "norm1000", [], E.EMPTY_PRED, 1),
    ("blank-desc", '{"objects": [{"desc": "   ", "bbox_2d": [1, 2, 3, 4]}]}', "norm1000", [], E.EMPTY_PRED, 1),
    ("missing-desc", '{"objects": [{"bbox_2d": [1, 2, 3, 4]}]}', "norm1000", [], E.EMPTY_PRED, 1),
    ("non-string-desc", '{"objects": [{"desc": 7, "bbox_2d": [1, 2, 3, 4]}]}', "norm1000", [], E.EMPTY_PRED, 1),
    ("desc-stripped", '{"objects": [{"desc": "  black cat \\n", "bbox_2d": [110, 310, 410, 705]}]}', "norm1000",
     [CAT], None, 0),
    # --- upstream's legacy shapes -----------------------------------------------------------------
    ("legacy-obj-key", '{"obj": ' + CAT_NUM + "}", "norm1000", [CAT], None, 0),
    ("legacy-object-map", '{"obj": ' + CAT_NUM + ', "obj2": {"desc": "dog", "bbox_2d": [1, 2, 3, 4]}}', "norm1000",
     [CAT, B([1, 2, 3, 4], "dog")], None, 0),
    ("legacy-index-keyed", '{"1": {"desc": "dog", "bbox_2d": [1, 2, 3, 4]}, "0": ' + CAT_TOK + "}", "norm1000",
     [CAT, B([1, 2, 3, 4], "dog")], None, 0),
    ("unicode-desc", '{"objects": [{"desc": "黑猫 🐈 café", "bbox_2d": [1, 2, 3, 4]}]}', "norm1000",
     [B([1, 2, 3, 4], "黑猫 🐈 café")], None, 0),
    # --- empty / unrecoverable ----------------------------------------------------------------
    ("empty-text", "", "norm1000", [], E.EMPTY_PRED, 0),
    ("whitespace-text", "  \n\t ", "norm1000", [], E.EMPTY_PRED, 0),
    ("only-im-end", "<|im_end|>", "norm1000", [], E.EMPTY_PRED, 0),
    ("valid-empty-objects", '{"objects": []}', "norm1000", [], None, 0),
    ("valid-empty-list", "[]", "norm1000", [], None, 0),
    ("prose-only", "I cannot see any objects in this image.", "norm1000", [], E.EMPTY_PRED, 0),
    ("json-string", '"hello"', "norm1000", [], E.EMPTY_PRED, 0),
    ("no-objects-key", '{"foo": 1}', "norm1000", [], E.EMPTY_PRED, 0),
    ("objects-not-list", '{"objects": "none"}', "norm1000", [], E.EMPTY_PRED, 0),
    ("list-of-numbers", "[1, 2, 3, 4]", "norm1000", [], E.EMPTY_PRED, 0),
    # --- what is kept / ignored ---------------------------------------------------------------
    ("score-hint-ignored", '{"objects": [{"desc": "black cat", "bbox_2d": [110, 310, 410, 705], "score": 0.12}]}',
     "norm1000", [CAT], None, 0),
    ("nested-extra-keys-ignored", '{"objects": [{"desc": "black cat", "bbox_2d": [110, 310, 410, 705], '
     '"attrs": {"color": ["black"], "pose": {"x": [1, 2]}}}], "meta": {"n": 1}}', "norm1000", [CAT], None, 0),
    ("duplicates-kept", '{"objects": [' + CAT_TOK + ", " + CAT_TOK + "]}", "norm1000", [CAT, CAT], None, 0),
    ("one-bad-one-good", '{"objects": [' + CAT_NUM + ', {"desc": "dog", "bbox_2d": [1, 2, 3, 1500]}]}',
     "norm1000", [CAT], None, 1),
    ("non-object-element-dropped", '{"objects": [' + CAT_NUM + ', "dog"]}', "norm1000", [CAT], None, 1),
    ("all-bad-first-reason-wins", '{"objects": [{"desc": "wire", "line": [1, 2, 3, 4]}, '
     '{"desc": "cat", "bbox_2d": [1, 2, 3, 1500]}]}', "norm1000", [], E.INVALID_GEOMETRY, 2),
]


@pytest.mark.parametrize("text,mode,preds,error,dropped", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parse_cases(text, mode, preds, error, dropped):
    r = parse_model_output(text, coord_mode=mode)
    assert isinstance(r, ParseResult)
    assert r.preds == preds
    assert all(p.score == 1.0 for p in r.preds)
    assert r.error == error
    assert r.num_dropped == dropped
    if error is None:
        assert r.error_message is None
    else:
        assert r.error_message
    # every drop is explained in repairs
    assert sum(1 for n in r.repairs if n.startswith("dropped objects[")) == dropped
    json.dumps(r.to_dict())  # always serialisable


def test_case_count():
    assert len(CASES) >= 40


# ----------------------------------------------------------------------------------------------
# Repair notes.


def test_drop_note_names_index_code_and_value():
    text = '{"objects": [' + CAT_NUM + ", " + CAT_NUM + ', {"desc": "dog", "bbox_2d": [1, 2, 3, 1204]}]}'
    r = parse_model_output(text)
    assert r.preds == [CAT, CAT]
    assert r.error is None and r.num_dropped == 1
    assert "dropped objects[2]: invalid_coord: 1204 > 999" in r.repairs


def test_all_dropped_error_message_is_first_drop():
    r = parse_model_output('{"objects": [{"desc": "cat", "bbox_2d": [1, 2, 3, 1204]}]}')
    assert r.error is ErrorCode.INVALID_COORD
    assert r.error_message == "dropped objects[0]: invalid_coord: 1204 > 999"


def test_truncation_is_noted():
    r = parse_model_output('{"objects": [' + CAT_TOK + ', {"desc": "dog", "bbox_2d": [' + T(5, 6))
    assert r.preds == [CAT] and r.truncated and r.num_dropped == 1
    assert any(n.startswith("dropped objects[1]: truncated: text cut mid-object") for n in r.repairs)
    assert any("appended ']}'" in n for n in r.repairs)


@pytest.mark.parametrize("text,needle", [
    ("{'objects': [{'desc': 'black cat', 'bbox_2d': [110, 310, 410, 705]}]}", "single quotes"),
    ('{"objects": [' + CAT_NUM[:-1] + ",},]}", "trailing comma"),
    ('```json\n{"objects": [' + CAT_NUM + "]}\n```", "code fence"),
    ('Sure! {"objects": [' + CAT_NUM + "]}", "ignored text before"),
    ('{"objects": [' + CAT_NUM + "]} That is all.", "ignored text after"),
    ('{"objects": [' + CAT_NUM + ", " + CAT_NUM + "]}", "kept duplicate objects[1]"),
    ('{"objects": [{"desc": "a", "bbox_2d": [1.0, 2, 3, 4]}]}', "read 1.0 as 1"),
])
def test_repair_notes(text, needle):
    r = parse_model_output(text)
    assert r.preds and r.error is None
    assert any(needle in n for n in r.repairs), r.repairs


def test_clean_answer_has_no_repairs():
    r = parse_model_output('{"objects": [' + CAT_TOK + "]}<|im_end|>")
    assert r.repairs == [] and r.num_dropped == 0 and not r.truncated


def test_json_repair_truncated_array_is_not_a_box():
    """json_repair alone would turn this into a 2-number box; we drop the object instead."""
    r = parse_model_output('{"objects": [{"desc": "cat", "bbox_2d": [<|coord_1|>, <|coord_2|>')
    assert r.preds == [] and r.error is ErrorCode.EMPTY_PRED and r.num_dropped == 1 and r.truncated


# ----------------------------------------------------------------------------------------------
# Issue 14: upstream's contract (empty_pred, the non-fatal `errors` list, geometry at pixel size).


def test_nothing_recoverable_is_empty_pred_with_the_detail():
    """The contract has no parse_failed: upstream says empty_pred; the reason stays in error_message."""
    for text in ("I cannot see any objects.", '{"foo": 1}', "[1, 2, 3, 4]", '{"objects": ['):
        r = parse_model_output(text)
        assert r.preds == [] and r.error is ErrorCode.EMPTY_PRED and r.error_message, text
    assert "no JSON object or list" in parse_model_output("prose only").error_message
    assert "parse_failed" not in {c.value for c in ErrorCode}


def test_errors_list_keeps_codes_of_dropped_objects_beside_survivors():
    """A `line` geometry and a bad coordinate leave their codes on the line although CAT survives."""
    text = ('{"objects": [{"desc": "wire", "line": [1, 2, 3, 4]}, ' + CAT_NUM
            + ', {"desc": "d", "bbox_2d": [1, 2, 3, 1204]}, {"desc": "e", "bbox_2d": [1, 2, 3]}, {"bbox_2d": [1, 2, 3, 4]}]}')
    r = parse_model_output(text)
    assert r.preds == [CAT] and r.error is None and r.num_dropped == 4
    assert r.errors == [E.INVALID_GEOMETRY, E.INVALID_COORD, E.INVALID_GEOMETRY]  # a missing desc has no code
    assert r.to_dict()["errors"] == ["invalid_geometry", "invalid_coord", "invalid_geometry"]
    assert "dropped objects[4]: missing_desc: no desc" in r.repairs


def test_degenerate_at_pixel_size_is_invalid_geometry():
    """[10, 10, 11, 12] on the grid is 1-2 grid cells: at 64x48 pixels x1 and x2 round to the same pixel."""
    text = '{"objects": [{"desc": "speck", "bbox_2d": [10, 10, 11, 12]}, ' + CAT_NUM + "]}"
    assert len(parse_model_output(text).preds) == 2  # without a size nothing is checked
    r = parse_model_output(text, width=64, height=48)
    assert r.preds == [CAT] and r.errors == [E.INVALID_GEOMETRY] and r.error is None
    assert any(n.startswith("dropped objects[0]: invalid_geometry: bbox_2d has zero area at 64x48") for n in r.repairs)
    # a flat polygon (all on one row of pixels) too; at a large size the same box survives
    flat = '{"objects": [{"desc": "rim", "poly": [0, 500, 500, 500, 999, 501]}]}'
    r = parse_model_output(flat, width=640, height=2)
    assert r.preds == [] and r.error is E.INVALID_GEOMETRY and r.num_dropped == 1
    assert parse_model_output(text, width=4000, height=4000).preds[0].desc == "speck"


def test_all_dropped_without_a_code_is_empty_pred():
    r = parse_model_output('{"objects": [{"bbox_2d": [1, 2, 3, 4]}, 7]}')
    assert r.error is E.EMPTY_PRED and r.errors == [] and r.num_dropped == 2
    assert r.error_message == "dropped objects[0]: missing_desc: no desc"


# ----------------------------------------------------------------------------------------------
# Round trip with the CoordJSON writer, and truncation at every character.

SPECS = [PromptSpec(coord_format=f, field_order=o) for f in ("tokens", "numeric")
         for o in ("desc_first", "geometry_first")]
SPEC_IDS = [f"{s.coord_format}-{s.field_order}" for s in SPECS]

OBJECT_SETS = [
    [],
    [{"desc": "black cat", "bbox_2d": [110, 310, 410, 705]}],
    [{"desc": "black cat", "bbox_2d": [110, 310, 410, 705]},
     {"desc": "狗's bowl \"big\"", "poly": [500, 600, 700, 650, 650, 900]},
     {"desc": "edge", "bbox_2d": [0, 0, 999, 999]}],
    [{"desc": "a", "bbox_2d": [5, 5, 6, 6]}, {"desc": "a", "bbox_2d": [5, 5, 6, 6]}],  # duplicates kept
]


def _expected(objs, spec):
    from coordexp.prompt import sort_key

    objs = sorted(objs, key=lambda o: sort_key(o.get("bbox_2d") or o.get("poly")))
    out = []
    for o in objs:
        gtype = "bbox_2d" if "bbox_2d" in o else "poly"
        out.append(PredObject(type=gtype, points=list(o[gtype]), desc=o["desc"], score=1.0))
    return out


@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("objs", OBJECT_SETS, ids=["empty", "one", "three", "dup"])
def test_round_trip(spec, objs):
    text = format_coordjson(objs, spec)
    for t in (text, text + "<|im_end|>"):
        r = parse_model_output(t)
        assert r.preds == _expected(objs, spec)
        assert r.error is None and r.num_dropped == 0 and not r.truncated


TWO = [{"desc": "black cat", "bbox_2d": [110, 310, 410, 705]},
       {"desc": "dog's bowl", "poly": [500, 600, 700, 650, 650, 900]}]


def _object_spans(text):
    """(start, end) of each object of the answer: end is just after its closing brace."""
    spans, depth, start = [], 0, None
    for i, c in enumerate(text):
        if c == "{":
            depth += 1
            if depth == 2:
                start = i
        elif c == "}":
            if depth == 2:
                spans.append((start, i + 1))
            depth -= 1
    return spans


@pytest.mark.parametrize("bare_list", [False, True], ids=["objects", "bare-list"])
@pytest.mark.parametrize("spec", SPECS, ids=SPEC_IDS)
def test_truncation_at_every_character(spec, bare_list):
    full = format_coordjson(TWO, spec)
    expected = _expected(TWO, spec)
    if bare_list:
        full = full[len('{"objects": '):-1]
        spans = [(s - 12, e - 12) for s, e in _object_spans('{"objects": ' + full + "}")]
    else:
        spans = _object_spans(full)
    assert len(spans) == 2
    for i in range(len(full) + 1):
        cut = full[:i]
        r = parse_model_output(cut)
        k = len(r.preds)
        assert r.preds == expected[:k], (i, cut)  # never a partial box / wrong object
        started = sum(1 for s, _ in spans if s < i)
        assert k + r.num_dropped == started, (i, cut, r.repairs)  # every started object accounted for
        if i >= spans[0][1]:
            assert k >= 1, (i, cut)  # the first object survives once it is complete
        if i >= spans[1][1]:
            assert k == 2 and r.num_dropped == 0, (i, cut)
        if i == 0:
            assert r.error is ErrorCode.EMPTY_PRED
        elif k:
            assert r.error is None
        else:
            assert r.error is ErrorCode.EMPTY_PRED, (i, cut)
        if k < 2 and r.num_dropped:
            assert any("dropped objects[" in n for n in r.repairs)
    assert parse_model_output(full).repairs == []


# ----------------------------------------------------------------------------------------------
# Modes, helpers, result.


def test_unknown_coord_mode_raises():
    with pytest.raises(ValueError, match="coord_mode"):
        parse_model_output('{"objects": []}', coord_mode="norm999")


def test_modes_are_the_grid_modes():
    from coordexp.grid import COORD_MODES

    for mode in COORD_MODES:
        assert parse_model_output('{"objects": []}', coord_mode=mode).error is None


def test_strip_special_keeps_coord_tokens():
    assert strip_special("<|box_start|>[<|coord_5|>]<|box_end|><|im_end|><|endoftext|>") == "[<|coord_5|>]"


def test_replace_coord_tokens():
    assert replace_coord_tokens('[<|coord_5|>, "<|coord_6|>", 7]') == ("[5, 6, 7]", 1)


def test_to_dict():
    r = parse_model_output('{"objects": [' + CAT_TOK + ', {"desc": "x", "line": [1, 2, 3, 4]}]}')
    d = r.to_dict()
    assert d == {
        "preds": [{"type": "bbox_2d", "points": [110, 310, 410, 705], "desc": "black cat", "score": 1.0}],
        "error": None,
        "error_message": None,
        "repairs": ["dropped objects[1]: invalid_geometry: geometry 'line' is not allowed (use bbox_2d or poly)"],
        "errors": ["invalid_geometry"],
        "num_dropped": 1,
        "truncated": False,
    }
    assert parse_model_output("").to_dict()["error"] == "empty_pred"


def test_bytes_and_none_input():
    assert parse_model_output(('{"objects": [' + CAT_NUM + "]}").encode()).preds == [CAT]
    assert parse_model_output(None).error is ErrorCode.EMPTY_PRED


def test_no_heavy_imports():
    code = ("import sys, coordexp.parser; "
            "bad = [m for m in ('torch', 'transformers', 'numpy', 'onnxruntime') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------
# `coordexp-client parse`.


def _cli(argv, capsys):
    from coordexp.client.cli import main

    rc = main(argv)
    return rc, capsys.readouterr().out


def test_cli_parse_file(tmp_path, capsys):
    f = tmp_path / "answer.txt"
    f.write_text('```json\n{"objects": [' + CAT_TOK + ', {"desc": "d", "bbox_2d": [1, 2, 3, 1204]}]}\n```\n',
                 encoding="utf-8")
    rc, out = _cli(["parse", str(f)], capsys)
    assert rc == 0
    d = json.loads(out)
    assert d["preds"] == [CAT.to_dict()]
    assert d["error"] is None and d["num_dropped"] == 1
    assert "dropped objects[1]: invalid_coord: 1204 > 999" in d["repairs"]


def test_cli_parse_stdin_error_still_rc0(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("no json here"))
    rc, out = _cli(["parse"], capsys)
    assert rc == 0
    d = json.loads(out)
    assert d["preds"] == [] and d["error"] == "empty_pred" and "no JSON" in d["error_message"]


def test_cli_parse_coord_mode(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO('[{"desc": "cat", "bbox_2d": [0, 0, 1000, 1000]}]'))
    rc, out = _cli(["parse", "-", "--coord-mode", "qwen3_rel1000"], capsys)
    d = json.loads(out)
    assert rc == 0 and d["coord_mode"] == "qwen3_rel1000" and d["preds"][0]["points"] == [0, 0, 1000, 1000]


def test_cli_parse_jsonl(tmp_path, capsys):
    f = tmp_path / "outputs.txt"
    f.write_text('{"objects": [' + CAT_TOK + "]}\n\n{\"objects\": []}\n{'objects': [{'desc': 'x', 'bbox_2d': [1, 2",
                 encoding="utf-8")
    rc, out = _cli(["parse", str(f), "--jsonl"], capsys)
    assert rc == 0
    lines = [json.loads(x) for x in out.splitlines()]
    assert [d["line"] for d in lines] == [1, 2, 3, 4]
    assert lines[0]["preds"] == [CAT.to_dict()] and lines[0]["error"] is None
    assert lines[1]["error"] == "empty_pred"
    assert lines[2]["preds"] == [] and lines[2]["error"] is None
    assert lines[3]["error"] == "empty_pred" and lines[3]["num_dropped"] == 1


def test_cli_parse_predictions_field(tmp_path, capsys):
    recs = [
        {"image_id": 0, "images": ["a.png"], "width": 10, "height": 10, "coord_mode": "norm1000",
         "raw_output": '{"objects": [' + CAT_TOK + "]}", "preds": []},
        {"image_id": 1, "images": ["b.png"], "width": 10, "height": 10, "coord_mode": "qwen3_rel1000",
         "raw_output": '{"objects": [{"desc": "cat", "bbox_2d": [0, 0, 1000, 1000]}]}', "preds": []},
    ]
    f = tmp_path / "predictions.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs) + "not json\n", encoding="utf-8")
    rc, out = _cli(["parse", str(f), "--field", "raw_output"], capsys)
    assert rc == 0
    lines = [json.loads(x) for x in out.splitlines()]
    assert lines[0]["image_id"] == 0 and lines[0]["preds"] == [CAT.to_dict()]
    assert lines[1]["image_id"] == 1 and lines[1]["coord_mode"] == "qwen3_rel1000"
    assert lines[1]["preds"][0]["points"] == [0, 0, 1000, 1000] and lines[1]["error"] is None
    assert lines[2]["line"] == 3 and lines[2]["error"] == "invalid_input"
    # an explicit --coord-mode wins over the record's
    rc, out = _cli(["parse", str(f), "--field", "raw_output", "--coord-mode", "norm1000"], capsys)
    assert json.loads(out.splitlines()[1])["error"] == "invalid_coord"


# ----------------------------------------------------------------------------------------------
# Inverted boxes (issue 19): kept as written, with a note everywhere the parse goes.

INVERTED = '{"objects": [{"desc": "orange triangle", "bbox_2d": [' + T(802, 79, 503, 260) + ']}]}'


def test_inverted_box_is_kept_as_written_with_a_note():
    r = parse_model_output(INVERTED, width=128, height=128)
    assert r.error is None and r.preds == [B([802, 79, 503, 260], "orange triangle")]  # never swapped
    notes = [n for n in r.repairs if "inverted" in n]
    assert notes == ["objects[0]: inverted bbox_2d [802, 79, 503, 260] (x2 < x1): kept as written, not swapped "
                     "(eval scores it as drawn: no area; --compat coordexp drops it, as upstream)"]
    both = parse_model_output('[{"desc": "d", "bbox_2d": [9, 9, 1, 1]}]')
    assert "(x2 < x1 and y2 < y1)" in both.repairs[-1]
    assert not any("inverted" in n for n in parse_model_output('[{"desc": "d", "bbox_2d": [1, 1, 9, 9]}]').repairs)


def test_inverted_box_note_reaches_parse_output_and_prediction_records(tmp_path, capsys):
    from coordexp.dataset import DatasetItem
    from coordexp.generation import GenerationResult
    from coordexp.runner import prediction_from_generation

    f = tmp_path / "answer.txt"
    f.write_text(INVERTED, encoding="utf-8")
    rc, out = _cli(["parse", str(f)], capsys)
    assert rc == 0 and any("inverted bbox_2d" in n for n in json.loads(out)["repairs"])
    item = DatasetItem(index=0, line_no=1, images=["images/val_00000.png"], width=128, height=128)
    rec = prediction_from_generation(item, GenerationResult(text=INVERTED, token_ids=[1, 2]))
    line = json.loads(rec.to_json())
    assert line.get("error") is None and line["preds"][0]["points"] == [802, 79, 503, 260]
    assert any("inverted bbox_2d [802, 79, 503, 260]" in n for n in line["repairs"])


def test_inverted_box_is_a_false_positive_by_default_and_dropped_in_upstream_mode(tmp_path):
    """Upstream parity: its parser keeps the box as written and its evaluator drops it (x2 <= x1)."""
    from coordexp.eval import evaluate

    gt = tmp_path / "gt.jsonl"
    gt.write_text(json.dumps({"images": ["a.png"], "width": 128, "height": 128,
                              "objects": [{"desc": "orange triangle", "bbox_2d": [503, 79, 802, 260]}]}) + "\n")
    r = parse_model_output(INVERTED, width=128, height=128)
    pred = tmp_path / "pred.jsonl"
    pred.write_text(json.dumps({"image_id": 0, "images": ["a.png"], "width": 128, "height": 128,
                                "coord_mode": "norm1000", "raw_output": INVERTED, "repairs": r.repairs,
                                "preds": [p.to_dict() for p in r.preds]}) + "\n")
    ours = evaluate(str(pred), str(gt), None, semantic=False, plots=False)["f1ish"]["0.50"]["loc"]["micro"]
    assert (ours["tp"], ours["fp"], ours["fn"]) == (0, 1, 1)
    up = evaluate(str(pred), str(gt), None, semantic=False, desc_match="exact", plots=False, compat="coordexp")
    assert up["compat"]["pred_degenerate_dropped"] == 1
    assert (up["f1ish"]["0.50"]["loc"]["micro"]["fp"], up["f1ish"]["0.50"]["loc"]["micro"]["fn"]) == (0, 1)
