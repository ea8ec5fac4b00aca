"""The `postprocess` model: generated ids -> model text + parsed predictions.

Per request: output_ids INT32 [B, S], sequence_length INT32 [B, 1]
  -> text_output BYTES [B, 1] (the decoded text, coord tokens kept),
     preds_json BYTES [B, 1] (JSON {"preds": [...], "error", "error_message", "repairs"})

Decoding is the processor's (`CoordExpProcessor.decode`), parsing and repair the shared parser's
(`coordexp.parser.parse_model_output`): the same code the client and eval use on local runs.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from coordexp import wire
from coordexp.serving.common import (RequestError, TritonRequestView, bytes_array, config_parameters,
                                     error_response, repository_root, request_view, resolve, response)
from coordexp.wire import OUTPUT_IDS, PREDS_JSON, SEQUENCE_LENGTH, TEXT_OUTPUT


def preds_payload(text: str, coord_mode: str = "norm1000", bbox_format: str = "xyxy") -> dict[str, Any]:
    """What `preds_json` carries for one model text (`bbox_format`: the served prompt's)."""
    from coordexp.parser import parse_model_output

    parsed = parse_model_output(text, coord_mode=coord_mode, bbox_format=bbox_format)
    return {
        "preds": [p.to_dict() for p in parsed.preds],
        "error": str(parsed.error) if parsed.error is not None else None,
        "error_message": parsed.error_message,
        "repairs": list(parsed.repairs),
        "bbox_format": bbox_format,
    }


class Postprocessor:
    def __init__(self, processor: Any, coord_mode: str = "norm1000", bbox_format: str = "xyxy"):
        self.processor = processor
        self.coord_mode = coord_mode
        self.bbox_format = bbox_format

    @classmethod
    def from_dir(cls, processor_dir: str, coord_mode: str = "norm1000", bbox_format: str = "xyxy") -> "Postprocessor":
        from coordexp.processor import CoordExpProcessor

        return cls(CoordExpProcessor.from_pretrained(processor_dir), coord_mode, bbox_format)

    def process(self, sequences: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        texts = [self.processor.decode(list(s)) for s in sequences]
        payloads = [json.dumps(preds_payload(t, self.coord_mode, self.bbox_format), ensure_ascii=False) for t in texts]
        return {TEXT_OUTPUT: bytes_array(texts), PREDS_JSON: bytes_array(payloads)}

    def process_request(self, view: TritonRequestView) -> dict[str, np.ndarray]:
        ids = np.asarray(view.need(OUTPUT_IDS))
        if ids.ndim != 2:
            raise RequestError(f"{OUTPUT_IDS}: expected [B, S], got {list(ids.shape)}")
        lengths = view.get(SEQUENCE_LENGTH)
        lens = (np.asarray(lengths).reshape(ids.shape[0], -1)[:, 0] if lengths is not None
                else np.full(ids.shape[0], ids.shape[1]))
        return self.process([ids[i, :int(lens[i])].tolist() for i in range(ids.shape[0])])


class TritonPythonModel:
    """Triton Python-backend model `postprocess`."""

    def initialize(self, args: dict[str, Any]) -> None:
        from coordexp.serving.common import die_with_parent

        die_with_parent()  # no stub outlives its server
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        params = config_parameters(args["model_config"])
        root = repository_root(args)
        self.post = Postprocessor.from_dir(resolve(root, params["processor_dir"]),
                                           params.get("coord_mode") or "norm1000", params.get("bbox_format") or "xyxy")

    def execute(self, requests: list[Any]) -> list[Any]:
        out = []
        for request in requests:
            try:
                view = request_view(self.pb, request, wire.input_names(wire.POSTPROCESS))
                out.append(response(self.pb, self.post.process_request(view)))
            except Exception as e:
                out.append(error_response(self.pb, e))
        return out
