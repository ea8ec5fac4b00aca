"""The TensorRT-LLM back end, serving side (never executed here: its dry run and its glue are what the
tests run). Its export side lives with the other formats: `coordexp.export.trtllm_export`
(`export_trtllm`, what `build_engine --backend trtllm` calls; `python -m coordexp.export.trtllm_export`),
`coordexp.export.trtllm_repository` (the writer) and `coordexp.export.trtllm_compat`.

- `plan`: pinned versions, options, checkpoint facts, the LLM API config, the commands (`make_plan`);
- `inputs`: the ONNX `llm` step's tensors -> what the LLM API takes (image, prompt, sampling);
- `llm_model`: the Triton `llm` / `llm_stream` model on `tensorrt_llm.LLM` (`TrtllmBatcher`);
- `vision`: the Triton `vision_encoder` model on a TensorRT engine.

Nothing imports tensorrt_llm, tensorrt or torch at module level.
"""
