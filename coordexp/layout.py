"""Where things lie in a model repository: paths relative to its root, shared by the writer
(`coordexp.export.repository`), the Triton models (`coordexp.serving`) and the engines that open a
repository in process.

The ONNX graphs (vision.onnx, embed.onnx, decoder.onnx, onnx_meta.json) live once, inside the llm
model's version folder; vision_encoder reads the same folder through its `onnx_dir` parameter (a
torch repository holds the checkpoint copy at HF_SUBDIR instead). The processor files (tokenizer,
chat template, image processor config; no weights) live once in preprocess/1/processor, which
postprocess reads through its `processor_dir` parameter. Triton ignores non-numeric folders inside a
model's version folder, and a folder at the repository root that is not a model would make the
server fail to start, so nothing else sits at the root except manifest.json.
"""
ONNX_SUBDIR = "llm/1/onnx"
HF_SUBDIR = "llm/1/hf"  # --backend torch: the checkpoint copy (weights included) the torch steps load
PROCESSOR_SUBDIR = "preprocess/1/processor"
MANIFEST = "manifest.json"
ONNX_META = "onnx_meta.json"
