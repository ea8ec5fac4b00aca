"""The one coordinate converter and the typed records."""
import pytest

from coordexp.grid import bbox_of, from_pixels, grid_to_pixel, pixel_to_grid, to_pixels
from coordexp.prompt import PromptSpec, format_coordjson
from coordexp.schema import ContractError, ErrorCode, InputRecord, PredictionRecord
from coordexp.tokens import coord_token, coord_token_value


@pytest.mark.parametrize("size", [1, 2, 3, 96, 128, 999, 1000, 1001, 4000])
def test_edges_map_to_grid_ends_and_back(size):
    last = size - 1
    if size == 1:
        assert pixel_to_grid(0, 1) == 0 and grid_to_pixel(999, 1) == 0
        return
    assert pixel_to_grid(0, size) == 0
    assert pixel_to_grid(last, size) == 999
    assert grid_to_pixel(0, size) == 0.0
    assert grid_to_pixel(999, size) == float(last)


@pytest.mark.parametrize("size", [2, 7, 96, 640, 999, 1000, 1920])
def test_grid_round_trip_is_exact_on_the_grid(size):
    for k in range(1000):
        assert pixel_to_grid(grid_to_pixel(k, size), size) == k


@pytest.mark.parametrize("size", [2, 50, 640])
def test_pixel_round_trip_error_is_at_most_half_a_cell(size):
    cell = (size - 1) / 999
    for px in range(size):
        back = grid_to_pixel(pixel_to_grid(px, size), size)
        assert abs(back - px) <= cell / 2 + 1e-9


def test_contract_formulas():
    # k = round(px / (W - 1) * 999); px = k / 999 * (W - 1), clamped
    assert pixel_to_grid(64, 128) == round(64 / 127 * 999)
    assert grid_to_pixel(500, 128) == pytest.approx(500 / 999 * 127)
    assert grid_to_pixel(1200, 128) == 127.0 and grid_to_pixel(-5, 128) == 0.0
    assert pixel_to_grid(-3, 128) == 0 and pixel_to_grid(500, 128) == 999


def test_named_modes_are_never_guessed():
    assert to_pixels([0, 0, 999, 999], 128, 64) == [0.0, 0.0, 127.0, 63.0]
    assert to_pixels([0, 0, 1000, 500], 200, 100, mode="qwen3_rel1000") == [0.0, 0.0, 199.0, 50.0]
    # Qwen2.5-VL: absolute pixels of the resized image the model saw (here 2x smaller)
    assert to_pixels([10, 20, 50, 40], 200, 100, mode="pixel", model_size=(100, 50)) == [20.0, 40.0, 100.0, 80.0]
    assert from_pixels([20, 40, 100, 80], 200, 100, mode="pixel", model_size=(100, 50)) == [10, 20, 50, 40]
    assert from_pixels([0, 0, 199, 99], 200, 100, mode="qwen3_rel1000") == [0, 0, 995, 990]
    with pytest.raises(ValueError, match="unknown coord_mode"):
        to_pixels([1, 2, 3, 4], 10, 10, mode="relative")
    assert bbox_of([5, 1, 2, 9, 7, 3]) == [2, 1, 7, 9]


def test_coord_tokens():
    assert coord_token(0) == "<|coord_0|>" and coord_token(999) == "<|coord_999|>"
    assert coord_token_value("<|coord_17|>") == 17 and coord_token_value("<|coord_1200|>") == 1200
    assert coord_token_value("coord_17") is None
    with pytest.raises(ValueError):
        coord_token(1000)


def test_input_record_validation_names_the_problem():
    ok = InputRecord.from_dict({"images": ["a.png"], "width": 4, "height": 3, "summary": "s",
                                "objects": [{"desc": "cat", "bbox_2d": ["<|coord_1|>", 2, 3, 4]}]}, 7)
    assert ok.objects[0].points == [1, 2, 3, 4] and ok.extra == {"summary": "s"}
    cases = [
        ({"images": [], "width": 4, "height": 3}, ErrorCode.INVALID_INPUT, "images"),
        ({"images": ["a"], "width": 0, "height": 3}, ErrorCode.INVALID_INPUT, "'width'"),
        ({"images": ["a"], "width": 4, "height": 3, "objects": [{"desc": "", "bbox_2d": [1, 2, 3, 4]}]},
         ErrorCode.INVALID_INPUT, "desc"),
        ({"images": ["a"], "width": 4, "height": 3, "objects": [{"desc": "x", "bbox": [1, 2, 3, 4]}]},
         ErrorCode.INVALID_GEOMETRY, "'bbox'"),
        ({"images": ["a"], "width": 4, "height": 3, "objects": [{"desc": "x", "poly": [1, 2, 3, 4]}]},
         ErrorCode.INVALID_GEOMETRY, "poly"),
        ({"images": ["a"], "width": 4, "height": 3, "objects": [{"desc": "x", "bbox_2d": [1, 2, 3, "z"]}]},
         ErrorCode.INVALID_COORD, "'z'"),
    ]
    for d, code, needle in cases:
        with pytest.raises(ContractError) as e:
            InputRecord.from_dict(d, 7)
        assert e.value.code == code and needle in str(e.value) and "line 7" in str(e.value)


def test_prediction_record_round_trip():
    rec = PredictionRecord(image_id=3, images=["a.png"], width=10, height=20, raw_output="x",
                           error="empty_pred", repairs=["r"], extra={"num_tokens": 5})
    d = rec.to_dict()
    assert d["error"] == "empty_pred" and d["num_tokens"] == 5 and d["coord_mode"] == "norm1000"
    assert PredictionRecord.from_dict(d).to_dict() == d


def test_format_coordjson_orders_objects_and_fields():
    objs = [{"desc": "b", "bbox_2d": [5, 9, 6, 10]}, {"desc": "a", "poly": [1, 2, 3, 2, 2, 5]}]
    assert format_coordjson(objs, PromptSpec(coord_format="numeric")) == (
        '{"objects": [{"desc": "a", "poly": [1, 2, 3, 2, 2, 5]}, {"desc": "b", "bbox_2d": [5, 9, 6, 10]}]}')
    text = format_coordjson(objs[:1], PromptSpec(field_order="geometry_first"))
    assert text == ('{"objects": [{"bbox_2d": [<|coord_5|>, <|coord_9|>, <|coord_6|>, <|coord_10|>], '
                    '"desc": "b"}]}')
    with pytest.raises(ValueError, match="coord_format"):
        PromptSpec(coord_format="floats")
    assert PromptSpec(user_text="find cats").variant.endswith("+custom")
