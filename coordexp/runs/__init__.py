"""Run registry (SQLite), importers of run folders (ours and CoordExp's), run comparison.

`Registry` (registry.py) holds runs and per-image rows; `import_run_dir` (folders.py) turns a run
folder into rows; `compare_runs` (compare.py) gives deltas with paired-bootstrap intervals and flips;
`register` (register.py) is what infer / eval / pipeline call after a run.
"""
