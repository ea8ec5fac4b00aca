"""Multi-image group inference ("Stage-A"): mission folders of image groups -> one validated record
per group.

`discover` finds missions, groups and images (and reports what it skipped), `profiles` loads the
per-mission prompt texts (data files), `records` builds, validates and reads Stage-A lines in the
current and the older shape, `backends` runs single images on served models or a local engine, and
`run.run_group_missions` is the loop behind `coordexp-client group`.
"""
