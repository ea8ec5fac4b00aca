"""The decoding core every engine shares: the token choice (`sampling`) and the iteration-level
scheduler with its `DecodeRows` interface (`coordexp.serving.inflight`, driven by ONNX Runtime's
`OnnxRows` and PyTorch's `TorchRows`)."""
