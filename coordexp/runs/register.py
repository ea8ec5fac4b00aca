"""What `infer`, `eval` and `pipeline` call after a run: import its folder into the registry.

Registering is a side product: a failure to register warns on stderr and never fails the run.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from .importers import import_our_dir
from .registry import Registry


@dataclass(frozen=True)
class RegisterOptions:
    enabled: bool = True
    registry: str | None = None  # None: $COORDEXP_REGISTRY or the per-user default
    name: str | None = None


def record_vis(pred_path: str, vis_dir: str, opts: RegisterOptions) -> int | None:
    """Note a run's visualisation folder on its registry entry (the entry of the folder holding
    `pred_path`; none: nothing to note). Returns the run id or None; never fails the `vis` it follows."""
    if not opts.enabled:
        return None
    run_dir = os.path.dirname(os.path.abspath(pred_path))
    try:
        with Registry(opts.registry) as reg:
            row = reg.db.execute("SELECT id FROM runs WHERE run_dir = ? ORDER BY id LIMIT 1", (run_dir,)).fetchone()
            if row is None:
                return None
            reg.update_run(int(row[0]), vis_dir=os.path.abspath(vis_dir))
            return int(row[0])
    except Exception as e:  # noqa: BLE001 - as register_run
        print(f"warning: the registry entry was not updated: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def register_run(pred_path: str, opts: RegisterOptions, gt_path: str | None = None,
                 eval_dir: str | None = None, quiet: bool = False, failed: str | None = None) -> int | None:
    """Register the run folder holding `pred_path` (replacing an earlier entry of that folder);
    returns the run id, None when disabled or when it failed (with a warning). `failed`: the run
    itself failed (registered with status failed and this error)."""
    if not opts.enabled:
        return None
    run_dir = os.path.dirname(os.path.abspath(pred_path))
    try:
        run, rows = import_our_dir(run_dir, gt_path=gt_path, name=opts.name, pred_name=os.path.basename(pred_path),
                                   eval_dir=eval_dir)
        if failed:
            run.status, run.error = "failed", failed
        with Registry(opts.registry) as reg:
            run_id = reg.add_run(run, rows, replace=True)
            path = reg.path
    except Exception as e:  # noqa: BLE001 - registering must not fail the run it describes
        print(f"warning: run not registered: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    if not quiet:
        print(f"registered {run.kind} run {run_id} ({len(rows)} images) in {path}; "
              f"see it with: coordexp-client ui --registry {path}", file=sys.stderr)
    return run_id
