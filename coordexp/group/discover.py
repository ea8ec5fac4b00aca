"""Mission folders -> groups of images, in a fixed order, with everything skipped reported.

Layout: `<root>/<mission>/<label dir>/<group folder>/*.{jpg,jpeg,png}` (suffix case-insensitive).
Order: missions by name; per mission the label dirs in the upstream tool's order (`审核不通过` then
`审核通过`, so `--pass-groups/--fail-groups` sampling picks the same groups it does); groups by
folder name; images in natural order (`img2` before `img10`).
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from typing import Sequence

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LABEL_DIRS = {"审核不通过": "fail", "审核通过": "pass"}  # in processing order
GROUP_ID_RE = re.compile(r"^(QC-[A-Za-z]+-[0-9]{8}-[0-9]+)")


def natural_key(name: str) -> tuple:
    """Digits compare as numbers, the rest case-insensitively; the name itself breaks ties."""
    parts = re.split(r"(\d+)", name)
    return tuple((1, int(p), "") if p.isdigit() else (0, 0, p.lower()) for p in parts) + ((2, 0, name),)


def group_id_for(first_image: str, folder: str) -> str:
    """The QC ticket id at the start of the first image's stem, else the group folder's name."""
    m = GROUP_ID_RE.match(os.path.splitext(os.path.basename(first_image))[0])
    return m.group(1) if m else os.path.basename(folder)


@dataclass
class Group:
    mission: str
    label: str  # "pass" | "fail"
    group_id: str
    folder: str  # absolute path of the group folder
    images: list[str] = field(default_factory=list)  # absolute paths, natural order

    @property
    def names(self) -> list[str]:
        return [os.path.basename(p) for p in self.images]

    @property
    def where(self) -> str:
        """How messages name the group: mission/label dir/folder."""
        return "/".join(self.folder.replace(os.sep, "/").split("/")[-3:])


@dataclass
class Mission:
    name: str
    groups: list[Group] = field(default_factory=list)  # with at least one image
    empty_groups: list[Group] = field(default_factory=list)  # folders without a single image
    unknown: list[str] = field(default_factory=list)  # paths skipped: not a label dir / group folder / image
    sampling: dict[str, int] | None = None  # set by sample_groups


def _list(path: str) -> list[os.DirEntry]:
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def _scan_group(mission: str, label: str, folder: str, unknown: list[str]) -> Group:
    images = []
    for e in _list(folder):
        if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES:
            images.append(e.path)
        else:  # other files and nested folders are not part of the group: say so
            unknown.append(e.path)
    images.sort(key=lambda p: natural_key(os.path.basename(p)))
    gid = group_id_for(images[0], folder) if images else os.path.basename(folder)
    return Group(mission=mission, label=label, group_id=gid, folder=folder, images=images)


def scan_mission(root: str, name: str) -> Mission:
    m = Mission(name=name)
    mdir = os.path.join(root, name)
    entries = {e.name: e for e in _list(mdir)}
    for e in entries.values():
        if e.name not in LABEL_DIRS or not e.is_dir():
            m.unknown.append(e.path)
    for dirname, label in LABEL_DIRS.items():
        e = entries.get(dirname)
        if e is None or not e.is_dir():
            continue
        for g in _list(e.path):
            if not g.is_dir():
                m.unknown.append(g.path)
                continue
            group = _scan_group(name, label, os.path.abspath(g.path), m.unknown)
            (m.groups if group.images else m.empty_groups).append(group)
    return m


def discover(root: str, mission: str | None = None) -> list[Mission]:
    """Every mission under `root` (or just `mission`), in name order. Raises FileNotFoundError
    with the path when the root or the named mission is missing."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"input folder not found: {root}")
    if mission is not None:
        if not os.path.isdir(os.path.join(root, mission)):
            have = ", ".join(e.name for e in _list(root) if e.is_dir()) or "none"
            raise FileNotFoundError(f"mission folder not found: {os.path.join(root, mission)} (missions: {have})")
        return [scan_mission(root, mission)]
    return [scan_mission(root, e.name) for e in _list(root) if e.is_dir()]


def sample_groups(m: Mission, pass_n: int | None, fail_n: int | None, seed: int) -> None:
    """Keep at most `pass_n` pass and `fail_n` fail groups (None: all), picked reproducibly with
    `seed` (the upstream tool's scheme: Random(seed) for pass, Random(seed + 1) for fail), in
    discovery order. Empty groups are not sampled: they are always reported."""
    def pick(label: str, n: int | None, rng: random.Random) -> list[int]:
        idx = [i for i, g in enumerate(m.groups) if g.label == label]
        return idx if n is None or n >= len(idx) else rng.sample(idx, n)

    keep_pass = pick("pass", pass_n, random.Random(seed))
    keep_fail = pick("fail", fail_n, random.Random(seed + 1))
    keep = set(keep_pass) | set(keep_fail)
    m.sampling = {"pass_total": sum(g.label == "pass" for g in m.groups), "pass_selected": len(keep_pass),
                  "fail_total": sum(g.label == "fail" for g in m.groups), "fail_selected": len(keep_fail),
                  "seed": seed}
    m.groups = [g for i, g in enumerate(m.groups) if i in keep]


def all_groups(m: Mission) -> Sequence[Group]:
    """The groups a run accounts for: every group with images (after sampling) and every empty one."""
    return [*m.groups, *m.empty_groups]
