"""Demo and training tooling, kept out of the serving core (`coordexp/*.py` never imports it).

- `tiny`: tiny random Qwen3-VL / Qwen2.5-VL checkpoints (`coordexp-make-tiny`), with `tokenizer`,
  `chat_templates` and `configs` (sizes; shape-realistic dimensions for tests and benchmarks);
- `synthetic`: synthetic shapes datasets (`coordexp-client make-data`, `python -m coordexp.demo.synthetic`);
- `train`: trains the bundled demo checkpoint (`python -m coordexp.demo.train`), with `train_data`
  (batches, loss, schedule) and `train_eval` (its quick evaluation, AP via `coordexp.eval`);
- `run`: the one-command demo (`make demo`, `python -m coordexp.demo`).
"""
