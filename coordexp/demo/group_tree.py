"""Generated mission trees (synthetic shapes photos) for the tests, the benchmark and trying the
command: several missions, both labels, QC ids and folder-name ids, a resubmitted group, an empty
group, a corrupt image, mixed-case suffixes, `img2` before `img10`, and folders/files that are not
part of any group."""
from __future__ import annotations

import io
import os
import random
PASS, FAIL = "审核通过", "审核不通过"
MISSION_A, MISSION_B = "挡风板安装检查", "BBU接地线检查"
QC = "QC-ABC-20250101-7"


def _image_bytes(i: int, fmt: str) -> bytes:
    from coordexp.demo.synthetic import sample  # the demo model's kind of image

    img, _objects = sample(i, 128)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _put(folder: str, names: list[str], start: int) -> None:
    os.makedirs(folder, exist_ok=True)
    for k, name in enumerate(names):
        fmt = "PNG" if name.lower().endswith(".png") else "JPEG"
        with open(os.path.join(folder, name), "wb") as f:
            f.write(_image_bytes(start + k, fmt))


def build_tree(root: str) -> dict:
    """Writes the tree; returns what a run must find (expected groups per mission, in order)."""
    a, b = os.path.join(root, MISSION_A), os.path.join(root, MISSION_B)
    # mission A, fail first (the upstream order): the resubmission and the corrupt group
    _put(os.path.join(a, FAIL, QC), [f"{QC}_1.jpg", f"{QC}_2.jpg"], 0)
    _put(os.path.join(a, FAIL, "corrupt_group"), ["good.jpg", "bad.jpg"], 2)
    with open(os.path.join(a, FAIL, "corrupt_group", "bad.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 8)
    _put(os.path.join(a, PASS, QC), [f"{QC}_img10.JPG", f"{QC}_img2.png", f"{QC}_img1.jpeg"], 4)
    _put(os.path.join(a, PASS, "site_042"), ["b.PNG", "a.Jpg"], 7)
    os.makedirs(os.path.join(a, PASS, "empty_group"))
    with open(os.path.join(a, PASS, "empty_group", "notes.txt"), "w") as f:
        f.write("no photos")
    os.makedirs(os.path.join(a, "其他"))  # not a label folder
    # mission B: one group per label
    _put(os.path.join(b, PASS, "g1"), ["p1.jpg"], 9)
    _put(os.path.join(b, FAIL, "g2"), ["x10.png", "x9.png"], 10)
    return {
        MISSION_A: [("fail", QC, [f"{QC}_1.jpg", f"{QC}_2.jpg"]),
                    ("fail", "corrupt_group", ["bad.jpg", "good.jpg"]),
                    ("pass", QC, [f"{QC}_img1.jpeg", f"{QC}_img2.png", f"{QC}_img10.JPG"]),
                    ("pass", "site_042", ["a.Jpg", "b.PNG"]),
                    ("pass", "empty_group", [])],
        MISSION_B: [("fail", "g2", ["x9.png", "x10.png"]), ("pass", "g1", ["p1.jpg"])],
    }


def build_bench_tree(root: str, groups: int, images_per_group: tuple[int, int] = (3, 12), seed: int = 0) -> int:
    """One mission of `groups` pass groups with 3-12 images each; returns the number of images."""
    rng = random.Random(seed)
    n = 0
    for g in range(groups):
        k = rng.randint(*images_per_group)
        gid = f"QC-BEN-20250101-{g}"
        _put(os.path.join(root, MISSION_A, PASS, gid), [f"{gid}_{i}.png" for i in range(1, k + 1)], n)
        n += k
    return n
