"""The demo: kept out of the serving core (`coordexp/*.py` never imports it); its checkpoint and data
builders are in `coordexp.fixtures`.

- `train`: trains the bundled demo checkpoint (`python -m coordexp.demo.train`), with `train_data`
  (batches, loss, schedule) and `train_eval` (its quick evaluation, AP via `coordexp.eval`);
- `run`: the one-command demo (`make demo`, `python -m coordexp.demo`).
"""
