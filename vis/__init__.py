"""CoordExp visualisation: GT vs prediction overlays and the HTML gallery, from the artifact alone.

    from coordexp.vis import visualize, BoxAnnotator, PolygonAnnotator, LabelAnnotator, color_for
    index = visualize("predictions.jsonl", "data.jsonl", "vis_out", iou=0.5, only_errors=True)

Names resolve lazily (like coordexp.eval), so registering the `vis` command imports no Pillow.
"""
from __future__ import annotations

from coordexp.lazy import lazy_exports

_EXPORTS = {
    "visualize": "render", "render_overlay": "render", "build_reports": "render", "load_matches": "render",
    "overlay_size": "render", "panel_size": "render", "ImageReport": "render", "VIS_SCHEMA_VERSION": "render",
    "draw_predictions": "render",
    "BoxAnnotator": "annotators", "PolygonAnnotator": "annotators", "LabelAnnotator": "annotators",
    "VisObject": "annotators", "annotate_all": "annotators", "color_for": "annotators", "PALETTE": "annotators",
    "write_gallery": "gallery",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
