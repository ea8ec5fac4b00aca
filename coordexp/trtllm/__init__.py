"""The TensorRT-LLM back end (never executed here: its dry run and its glue are what the tests run).

- `plan`: pinned versions, options, checkpoint facts, the LLM API config, the commands (`make_plan`);
- `repository`: the repository writer (`write_trtllm_repository`);
- `export`: `export_trtllm` (what `build_engine --backend trtllm` calls) and `python -m coordexp.trtllm`;
- `inputs`: the ONNX `llm` step's tensors -> what the LLM API takes (image, prompt, sampling);
- `llm_model`: the Triton `llm` / `llm_stream` model on `tensorrt_llm.LLM` (`TrtllmBatcher`);
- `vision`: the Triton `vision_encoder` model on a TensorRT engine.

Nothing imports tensorrt_llm, tensorrt or torch at module level.
"""
