"""The group run behind `coordexp-client group`: per mission, every image of every pending group
goes to the backend at once (served: spread over the servers with the client's concurrency), and
groups are written back in discovery order as they complete.

Strict coverage: a group is written to `<mission>_stage_a.jsonl` only when every image got a
non-empty answer; otherwise it goes, with the reason per image, to `<mission>_stage_a.errors.jsonl`.
`summary.json` counts both per mission and label and checks that groups in = lines out.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

from coordexp.generation import EngineUnavailable
from coordexp.group import records as R
from coordexp.group.backends import ImageAnswer, ImageJob
from coordexp.group.discover import Group, Mission, all_groups, discover, sample_groups
from coordexp.group.profiles import DEFAULT_PROFILE, MissionPrompt, load_profile

TASKS = ("summary", "detect")
LAYOUTS = ("full", "served")


@dataclass(frozen=True)
class GroupRunOptions:
    input_dir: str
    output_dir: str
    mission: str | None = None  # None: every mission under input_dir
    task: str = "summary"  # "summary": free text per image; "detect": CoordJSON preds per image
    profile: str = DEFAULT_PROFILE  # a packaged profile name or a profile file
    legacy_keys: bool = False  # write 图片_N keys + timestamp (the older shape)
    resume: bool = False
    force: bool = False  # replace an earlier run's records in output_dir (refused without it, or --resume)
    pass_groups: int | None = None
    fail_groups: int | None = None
    seed: int = 42
    progress: bool | None = None  # None: when stderr is a terminal
    # Local engines only: "full" = the profile's system + user text; "served" = what a served model
    # gets (its export's system prompt, the mission's whole instruction as the user text).
    prompt_layout: str = "full"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r}; expected one of {', '.join(TASKS)}")
        if self.prompt_layout not in LAYOUTS:
            raise ValueError(f"prompt layout {self.prompt_layout!r}; expected one of {', '.join(LAYOUTS)}")
        for name in ("pass_groups", "fail_groups"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0")


def output_paths(output_dir: str, mission: str) -> tuple[str, str]:
    base = os.path.join(output_dir, f"{mission}_stage_a")
    return base + ".jsonl", base + ".errors.jsonl"


def judge(answer: ImageAnswer, task: str, bbox_format: str = "xyxy") -> tuple[str, list | None, dict[str, str] | None]:
    """(clean text, detect-mode preds, error or None) of one image's answer (`bbox_format`: the
    checkpoint's). In text mode the raw text is the answer: the served ensemble's CoordJSON parse is
    not looked at."""
    if answer.error:
        return "", None, {"error": answer.error, "message": answer.message or ""}
    clean = R.clean_text(answer.raw)
    if not clean:
        return "", None, {"error": R.EMPTY_ANSWER, "message": f"the answer is empty ({answer.raw!r})"}
    if task != "detect":
        return clean, None, None
    from coordexp.parser import parse_model_output

    parsed = parse_model_output(answer.raw, bbox_format=bbox_format)
    if parsed.error is not None:
        return clean, None, {"error": R.PARSE_FAILED, "message": parsed.error_message or str(parsed.error)}
    return clean, [p.to_dict() for p in parsed.preds], None


class GroupWriter:
    """Collects image answers (any order) and writes each group's line in discovery order."""

    def __init__(self, groups: list[Group], main_f: Any, errors_f: Any, task: str, legacy: bool,
                 bbox_format: str = "xyxy"):
        self.groups, self.main_f, self.errors_f, self.task, self.legacy = groups, main_f, errors_f, task, legacy
        self.bbox_format = bbox_format
        self.answers: list[list[ImageAnswer | None]] = [[None] * len(g.images) for g in groups]
        self.left = [len(g.images) for g in groups]
        self.next = 0
        self.counts: Counter[tuple[str, str]] = Counter()  # (label, "written"|"errors")
        self.image_errors: Counter[str] = Counter()
        self.images_done = 0
        self._flush()  # empty groups at the head are complete already

    def add(self, job: ImageJob, answer: ImageAnswer) -> None:
        if job.group < self.next or self.answers[job.group][job.index] is not None:
            raise ValueError(f"two answers for image {job.index + 1} of group {self.groups[job.group].where}")
        self.answers[job.group][job.index] = answer
        self.left[job.group] -= 1
        self.images_done += 1
        self._flush()

    def _flush(self) -> None:
        while self.next < len(self.groups) and self.left[self.next] == 0:
            self._write(self.groups[self.next], self.answers[self.next])
            self.answers[self.next] = []  # done: free the texts
            self.next += 1

    def _write(self, g: Group, answers: list[ImageAnswer | None]) -> None:
        if not g.images:
            errs = [{"image": None, "index": None, "error": R.EMPTY_GROUP,
                     "message": f"group folder {g.where} holds no .jpg/.jpeg/.png image"}]
            return self._put(self.errors_f, R.error_record(g, errs), g.label, "errors")
        cleans, preds, errs = [], [], []
        for i, (name, a) in enumerate(zip(g.names, answers)):
            clean, p, err = judge(a, self.task, self.bbox_format)
            cleans.append(clean)
            preds.append(p)
            if err:
                errs.append({"image": name, "index": i + 1, **err})
                self.image_errors[err["error"]] += 1
        raws = [a.raw for a in answers]
        if errs:
            return self._put(self.errors_f, R.error_record(g, errs, raws), g.label, "errors")
        rec = R.make_record(g, raws, cleans, self.legacy, preds if self.task == "detect" else None)
        self._put(self.main_f, rec, g.label, "written")

    def _put(self, f: Any, rec: dict[str, Any], label: str, kind: str) -> None:
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()  # a killed run leaves whole lines that --resume continues from
        self.counts[(label, kind)] += 1

    def counts_total(self, kind: str) -> int:
        return sum(v for (_, k), v in self.counts.items() if k == kind)

    @property
    def groups_done(self) -> int:
        return self.next


def _error_key(value: Any, where: str) -> tuple:
    if not isinstance(value, dict) or not isinstance(value.get("images"), list):
        raise R.RecordError(f"{where}: not a group line of an errors file")
    return (value.get("mission"), value.get("label"), value.get("group_id"),
            tuple(os.path.basename(str(x)) for x in value["images"]))


def _open_for_resume(path: str, kinds: str) -> tuple[Any, list[Any]]:
    """Open `path` for appending after its whole lines (a torn tail is cut); returns (file, keys,
    and the shapes of its lines)."""
    keys: list[Any] = []
    if os.path.exists(path):
        rows, size = R.read_lines(path)
        with open(path, "r+b") as f:
            f.truncate(size)
        for no, v in rows:
            where = f"{path}:{no}"
            keys.append(R.validate_record(v, where) if kinds == "main" else _error_key(v, where))
    return open(path, "a", encoding="utf-8"), keys


def _pending(groups: list[Group], done: list[tuple]) -> list[Group]:
    """The groups not written yet: each line already there accounts for one group with its key."""
    left = Counter(done)
    out = []
    for g in groups:
        k = (g.mission, g.label, g.group_id, tuple(g.names))
        if left[k] > 0:
            left[k] -= 1
        else:
            out.append(g)
    return out


def _jobs(groups: list[Group]) -> Iterator[ImageJob]:
    for gi, g in enumerate(groups):
        for ii, path in enumerate(g.images):
            yield ImageJob(group=gi, index=ii, path=path)


def _local_prompt(backend: Any, prompt: MissionPrompt, opts: GroupRunOptions) -> Any:
    base = backend.base_prompt
    if opts.task == "detect":
        return base
    if opts.prompt_layout == "served":
        return dataclasses.replace(base, user_text=prompt.served_user_text())
    return dataclasses.replace(base, system_text=prompt.system, user_text=prompt.user)


def _resume_files(main: str, errors: str, opts: GroupRunOptions) -> tuple[Any, Any, list[tuple], bool, int, int]:
    """(main file, errors file, keys done, legacy shape?, lines kept in each) for a resumed run: the
    main file may be in the older shape (the old tool's), and is then continued in that shape."""
    main_f, recs = _open_for_resume(main, "main")
    errors_f, err_keys = _open_for_resume(errors, "errors")
    shapes = {r.shape for r in recs}
    if len(shapes) > 1:
        main_f.close(), errors_f.close()
        raise R.RecordError(f"{main}: mixes the current (image_N) and the older (图片_N) shape; cannot resume")
    legacy = opts.legacy_keys or shapes == {"legacy"}
    if shapes == {"legacy"} and not opts.legacy_keys:
        print(f"note: {main} is in the older shape (图片_N keys); continuing it in that shape", file=sys.stderr)
    if shapes == {"current"} and opts.legacy_keys:
        main_f.close(), errors_f.close()
        raise R.RecordError(f"{main} is in the current shape (image_N keys); resume it without --legacy-keys")
    return main_f, errors_f, [r.key for r in recs] + err_keys, legacy, len(recs), len(err_keys)


def _file_labels(path: str) -> Counter[str]:
    """Lines per label in a written file (what the summary counts: the files, not our counters)."""
    if not os.path.exists(path):
        return Counter()
    rows, _ = R.read_lines(path)
    return Counter(str(v.get("label")) if isinstance(v, dict) else "?" for _, v in rows)


def _account(groups: list[Group], main: str, errors: str) -> dict[str, Any]:
    in_main, in_err = _file_labels(main), _file_labels(errors)
    by_label = {}
    for label in ("pass", "fail"):
        n = sum(g.label == label for g in groups)
        by_label[label] = {"groups": n, "main": in_main[label], "errors": in_err[label],
                           "accounted": in_main[label] + in_err[label] == n}
    lines_main, lines_err = sum(in_main.values()), sum(in_err.values())
    return {"groups_in": len(groups), "lines_main": lines_main, "lines_errors": lines_err,
            "accounted": lines_main + lines_err == len(groups), "by_label": by_label}


def _progress(total: int, mission: str, opts: GroupRunOptions):
    """A bar per image; its postfix counts groups done and groups sent to the errors file."""
    from tqdm import tqdm

    return tqdm(total=total, desc=f"group[{mission}]", unit="img", file=sys.stderr, dynamic_ncols=True,
                disable=None if opts.progress is None else not opts.progress, smoothing=0.1)


def run_mission(m: Mission, backend: Any, prompt: MissionPrompt, opts: GroupRunOptions) -> dict[str, Any]:
    """One mission: its groups through `backend`, lines written in discovery order. Returns the
    mission's summary (status "incomplete" when every server went away: --resume continues)."""
    main, errors = output_paths(opts.output_dir, m.name)
    groups = list(all_groups(m))
    if opts.resume:
        main_f, errors_f, done, legacy, kept_main, kept_err = _resume_files(main, errors, opts)
    else:
        main_f, errors_f = open(main, "w", encoding="utf-8"), open(errors, "w", encoding="utf-8")
        done, legacy, kept_main, kept_err = [], opts.legacy_keys, 0, 0
    pending = _pending(groups, done)
    started, status, failure, ended = time.perf_counter(), "complete", None, None
    total_images = sum(len(g.images) for g in pending)
    bar = _progress(total_images, m.name, opts)
    with main_f, errors_f:
        writer = GroupWriter(pending, main_f, errors_f, opts.task, legacy, backend.engine.prompt.bbox_format)

        def on_done(job: ImageJob, answer: ImageAnswer) -> None:
            writer.add(job, answer)
            bar.update(1)
            bar.set_postfix(groups=f"{writer.groups_done}/{len(pending)}",
                            failed=writer.counts_total("errors"), refresh=False)

        if backend.kind == "served":  # the served system prompt is the export's; only the user text travels
            how: Any = prompt.served_user_text() if opts.task == "summary" else None
            used = {"system": "(the served export's)", "user": how or "(the served export's)"}
        else:
            how = _local_prompt(backend, prompt, opts)
            used = {"system": how.system(), "user": how.user_text}
        try:
            backend.run(_jobs(pending), how, on_done)
        except EngineUnavailable as e:
            status, failure = "incomplete", f"{type(e).__name__}: {e}"
        except KeyboardInterrupt:  # Ctrl-C / SIGTERM: give the requests in flight up, keep what is written
            ended = time.perf_counter()
            backend.engine.cancel()
            status, failure = "interrupted", "interrupted (Ctrl-C / SIGTERM)"
        finally:
            bar.close()
    seconds = (ended or time.perf_counter()) - started
    summary = {
        "status": status, "failure": failure, "interrupted": status == "interrupted",
        "files": {"main": main, "errors": errors},
        "task": opts.task, "profile": prompt.profile, "prompt": used, "shape": "legacy" if legacy else "current",
        **_account(groups, main, errors),
        "written": writer.counts_total("written"), "errors": writer.counts_total("errors"),
        "resumed": {"main": kept_main, "errors": kept_err}, "image_errors": dict(writer.image_errors),
        "images": writer.images_done, "seconds": round(seconds, 3),
        "images_per_s": round(writer.images_done / seconds, 3) if seconds > 0 else None,
        "empty_groups": [g.where for g in m.empty_groups], "unknown_paths": list(m.unknown),
        "sampling": m.sampling, "engine": backend.describe(),
    }
    return summary


def write_summary(output_dir: str, missions: dict[str, dict[str, Any]], params: dict[str, Any]) -> str:
    """`summary.json`: this run's missions replace their own entries; other missions' stay."""
    path = os.path.join(output_dir, "summary.json")
    old: dict[str, Any] = {}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError):
            old = {}
    merged = {**(old.get("missions") or {}), **missions}
    body = {"missions": merged, "params": params,
            "totals": {k: sum(int(v.get(k) or 0) for v in merged.values())
                       for k in ("groups_in", "lines_main", "lines_errors")},
            "accounted": all(v.get("accounted") for v in merged.values()),
            "status": "complete" if all(v.get("status") == "complete" for v in merged.values()) else "incomplete"}
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(body, f, ensure_ascii=False, indent=2, default=str)
    os.replace(tmp, path)
    return path


def run_group_missions(opts: GroupRunOptions, backend: Any) -> dict[str, Any]:
    """Discover, sample, run every mission (stopping when the servers are gone), write summary.json.
    Raises FileNotFoundError (input / mission folder), ProfileError, RecordError (a file to resume
    that breaks the rules)."""
    profile = load_profile(opts.profile)
    missions = discover(opts.input_dir, opts.mission)
    if not opts.resume and not opts.force:
        held = [p for m in missions for p in output_paths(opts.output_dir, m.name)
                if os.path.isfile(p) and os.path.getsize(p) > 0]
        if held:
            raise FileExistsError(f"{opts.output_dir} already holds an earlier run's records ({', '.join(held[:3])}): "
                                  "continue it with --resume, replace it with --force, or pick another --output-dir")
    os.makedirs(opts.output_dir, exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    for m in missions:
        if opts.pass_groups is not None or opts.fail_groups is not None:
            sample_groups(m, opts.pass_groups, opts.fail_groups, opts.seed)
        done[m.name] = run_mission(m, backend, profile.for_mission(m.name), opts)
        if done[m.name]["status"] != "complete":
            break
    params = dataclasses.asdict(backend.params)
    path = write_summary(opts.output_dir, done, params)
    return {"summary_path": path, "missions": done}
