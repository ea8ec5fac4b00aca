"""`python -m coordexp.trtllm onnx|versions`: the TensorRT-LLM export's own steps (coordexp.trtllm.export)."""
from coordexp.trtllm.export import main

raise SystemExit(main())
