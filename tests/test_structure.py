"""The house rules, checked: one wire table drives configs, models and client; one checkpoint digest
everywhere; parity goes through the shipped client; the core imports nothing of the project; no
import cycles; the reference repository in model_repository/ is what the writer writes."""
from __future__ import annotations

import ast
import dataclasses
import filecmp
import json
import os

import pytest

from coordexp import wire
from coordexp.generation import GenerationParams

from conftest import REPO_ROOT, SERVED_MAX_NEW

# top-level folders -> the package they are installed as (pyproject.toml [tool.setuptools])
PACKAGES = {"coordexp": "coordexp", "client": "coordexp.client", "eval": "coordexp.eval", "vis": "coordexp.vis",
            "export": "coordexp.export"}


def _modules() -> dict[str, str]:
    """Every project module (dotted name -> file)."""
    out = {}
    for folder, pkg in PACKAGES.items():
        for dp, _, files in os.walk(os.path.join(REPO_ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dp, f), os.path.join(REPO_ROOT, folder))[:-3]
                    parts = [p for p in rel.split(os.sep) if p != "__init__"]
                    out[".".join([pkg, *parts])] = os.path.join(dp, f)
    return out


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """Project modules imported anywhere in the module (function-level imports too)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = name.split(".") if path.endswith("__init__.py") else name.split(".")[:-1]
    deps = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        elif isinstance(node, ast.Import):
            deps.update(a.name for a in node.names)
    return {d for d in deps if d in modules and d != name}


def test_the_core_imports_nothing_of_the_project_and_there_are_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    core = {m for m, p in modules.items() if m.count(".") == 1 and m.startswith("coordexp.")
            and not p.endswith("__init__.py")}
    assert {"coordexp.wire", "coordexp.checkpoint", "coordexp.parser", "coordexp.runner"} <= core
    leaks = {m: sorted(d for d in graph[m] if d not in core and d != "coordexp") for m in core}
    assert not {m: d for m, d in leaks.items() if d}, "core modules import the periphery"
    # cycles: depth-first search for a back edge
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_there_are_no_package_cycles():
    """Packages (coordexp.X, the core modules counting as `coordexp`) import each other without a
    cycle of any length: a command lives in client/, a library never reaches back into it."""
    modules = _modules()
    packages = {m for m, p in modules.items() if p.endswith("__init__.py") and m.count(".") == 1}

    def package(m: str) -> str:
        top = ".".join(m.split(".")[:2])
        return top if top in packages else "coordexp"

    edges: dict[str, dict[str, tuple[str, str]]] = {}
    for m, p in modules.items():
        for d in _imports(m, p, modules):
            a, b = package(m), package(d)
            if a != b:
                edges.setdefault(a, {}).setdefault(b, (m, d))
    # Tarjan's strongly connected components: any component of two or more packages is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(packages | {"coordexp"}):
        if v not in index:
            visit(v)
    why = [{a: edges[a][b] for a in comp for b in comp if b in edges.get(a, {})} for comp in cycles]
    assert not cycles, f"package cycles {cycles}; through {why}"


def test_nobody_assigns_an_engines_prompt():
    """A request's prompt goes with the call (`generate_batch(..., prompt=)`), never by changing
    the engine under other callers (threads share engines)."""
    import re

    offenders = [f"{m}:{n}" for m, p in _modules().items() for n, line in enumerate(open(p, encoding="utf-8"), 1)
                 if re.search(r"engine\.prompt\s*=[^=]", line)]
    assert not offenders


def test_engine_capabilities_are_called_not_probed():
    """Every `Engine` capability is declared (`coordexp.generation.Engine`, defaults in
    `EngineDefaults`, which each engine inherits): nobody probes one with getattr."""
    import re

    from coordexp.generation import Engine, EngineDefaults

    names = ("concurrent", "takes_encoded", "checkpoint_sha256", "cancel", "progress_name", "progress_facts",
             "run_facts")
    assert all(hasattr(EngineDefaults, n) for n in names)
    assert set(names) <= set(Engine.__annotations__) | {n for n in vars(Engine) if not n.startswith("_")}
    probe = re.compile(r"getattr\([^,]+,\s*[\"'](" + "|".join(names) + r")[\"']")
    offenders = [f"{m}:{n}" for m, p in _modules().items() for n, line in enumerate(open(p, encoding="utf-8"), 1)
                 if probe.search(line)]
    assert not offenders


def test_demo_code_is_imported_only_by_the_demo():
    """`coordexp.demo` (the demo's training and run) is imported by nothing else: benchmarks, tests'
    fixtures and commands build checkpoints and data through `coordexp.fixtures`."""
    modules = _modules()
    users = {m: sorted(d for d in _imports(m, p, modules) if d == "coordexp.demo" or d.startswith("coordexp.demo."))
             for m, p in modules.items() if not m.startswith("coordexp.demo")}
    assert not {m: d for m, d in users.items() if d}


def test_one_construction_site_of_the_triton_client():
    """Every Triton connection comes from `coordexp.engines.triton.connect.new_client` (the launcher's
    readiness probe aside): one place sets the channel options, message limits and retries."""
    sites = sorted(m for m, p in _modules().items() if "InferenceServerClient(" in open(p, encoding="utf-8").read())
    assert sites == ["coordexp.engines.triton.connect", "coordexp.serving.server"]


def test_one_decode_loop_and_one_sampler():
    """Every engine decodes through `coordexp.decoding.loop` and chooses tokens through
    `coordexp.decoding.sampling`: no other module steps a decoder over `max_new_tokens` or draws a
    token from a softmax (the behaviour tests compare the engines' answers; this keeps copies out)."""
    import re

    home = {"coordexp.decoding.loop", "coordexp.decoding.sampling"}
    loops = re.compile(r"for \w+ in range\((params|p)\.max_new_tokens\)")
    draws = re.compile(r"np\.searchsorted\(cdf|np\.argmax\(logits|def \w*top_p\w*\(|def _?softmax\(")
    copies = {m: [n for n, line in enumerate(open(p, encoding="utf-8"), 1) if loops.search(line) or draws.search(line)]
              for m, p in _modules().items() if m not in home}
    assert not {m: lines for m, lines in copies.items() if lines}


def test_the_wire_table_drives_configs_and_client(monkeypatch):
    """Rename one ensemble input in the table: the generated ensemble config and the client's request
    both use the new name, and the client refuses a model that still has the old one."""
    from coordexp.engines.triton.interface import ModelInterface, build_arrays
    from coordexp.export.model_configs import ensemble_config

    renamed = tuple(dataclasses.replace(t, name="seed_renamed") if t.name == wire.RANDOM_SEED else t
                    for t in wire.ENSEMBLE_INPUTS)
    monkeypatch.setattr(wire, "ENSEMBLE_INPUTS", renamed)
    cfg = ensemble_config("coordexp", 4, {})
    names = [t.name for t in cfg.input]
    assert "seed_renamed" in names and wire.RANDOM_SEED not in names

    def metadata(inputs):
        return {"name": "coordexp", "versions": ["1"], "outputs": [{"name": t.name, "datatype": t.wire_dtype,
                                                                     "shape": [-1, *t.dims]}
                                                                    for t in wire.ENSEMBLE_OUTPUTS],
                "inputs": [{"name": t.name, "datatype": t.wire_dtype, "shape": [-1, *t.dims]} for t in inputs]}

    iface = ModelInterface.from_metadata(metadata(renamed), {"max_batch_size": 4})
    assert iface.problems() == []
    arrays = build_arrays(iface, GenerationParams(seed=7), b"img")
    assert int(arrays["seed_renamed"].reshape(-1)[0]) == 7 and wire.RANDOM_SEED not in arrays
    old = ModelInterface.from_metadata(metadata([t for t in renamed if t.name != "seed_renamed"]),
                                       {"max_batch_size": 4})
    assert old.problems() == ["input 'seed_renamed' (UINT64) is missing"]


def test_the_reference_repository_is_current(tmp_path):
    """model_repository/reference/ equals what the writer makes from the demo checkpoint now."""
    from coordexp.export.reference import REFERENCE_DIR, write_reference

    files = write_reference(tmp_path / "ref")
    tracked = sorted(str(p.relative_to(REFERENCE_DIR)) for p in REFERENCE_DIR.rglob("*") if p.is_file())
    assert files == tracked, "model_repository/reference is stale: run python -m coordexp.export.reference"
    match, mismatch, errors = filecmp.cmpfiles(REFERENCE_DIR, tmp_path / "ref", files, shallow=False)
    assert not mismatch and not errors, f"stale files {mismatch + errors}: run python -m coordexp.export.reference"
    # every served model of the ensemble is a folder there, its config beside its code
    for model in (*wire.MODELS, wire.LLM_STREAM, wire.stream_ensemble_name(wire.ENSEMBLE)):
        assert (REFERENCE_DIR / model / "config.pbtxt").is_file()


@pytest.mark.slow
@pytest.mark.triton
def test_one_checkpoint_digest_everywhere(exported, server, sample_data, tmp_path):
    """onnx_meta.json, the served manifest.json and every engine's summary.json name the weights alike."""
    from coordexp.checkpoint import checkpoint_digest
    from coordexp.engines import load_engine
    from coordexp.engines.triton import ClientOptions, TritonEngine
    from coordexp.runner import run_dataset
    from coordexp.serving import common as C

    ckpt, repo = exported
    sha = checkpoint_digest(ckpt).sha256
    meta = json.loads(open(os.path.join(repo, C.ONNX_SUBDIR, C.ONNX_META)).read())
    manifest = json.loads(open(os.path.join(repo, C.MANIFEST)).read())
    assert meta["checkpoint_sha256"] == manifest["checkpoint"]["weights_sha256"] == sha
    data = tmp_path / "two.jsonl"
    data.write_text("".join(open(sample_data).readlines()[:2]))
    os.symlink(os.path.join(os.path.dirname(sample_data), "images"), tmp_path / "images")
    params = GenerationParams(max_new_tokens=4)
    engines = {"torch": load_engine("torch", ckpt, threads=1), "onnx": load_engine("onnx", repo, threads=1),
               "triton": TritonEngine.connect([server.grpc_url], ClientOptions())}
    try:
        for name, engine in engines.items():
            s = run_dataset(str(data), str(tmp_path / name / "p.jsonl"), engine, params, progress=False)
            assert s.to_dict()["checkpoint_sha256"] == sha, name
    finally:
        engines["triton"].close()
    assert SERVED_MAX_NEW >= 4


@pytest.mark.slow
@pytest.mark.triton
def test_parity_goes_through_the_shipped_client(exported, server, sample_data, monkeypatch, capsys):
    """`coordexp-client parity` asks the server through TritonEngine.generate_batch, the client users run."""
    from coordexp.client import cli
    from coordexp.engines.triton import TritonEngine

    calls = []
    real = TritonEngine.generate_batch

    def spy(self, images, params):
        calls.append(len(images))
        return real(self, images, params)

    monkeypatch.setattr(TritonEngine, "generate_batch", spy)
    ckpt, repo = exported
    rc = cli.main(["parity", "--ckpt", ckpt, "--repo", repo, "--data", sample_data, "--url", server.grpc_url,
                   "--limit", "2", "--batch-sizes", "1", "--max-new-tokens", "6", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert calls == [2] and "all pairs match" in out


def test_every_package_is_installed():
    """pyproject.toml lists every package folder (a forgotten one imports in an editable install only)."""
    import tomllib

    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = set()
    for folder, pkg in PACKAGES.items():
        for dp, _, files in os.walk(os.path.join(REPO_ROOT, folder)):
            if "__init__.py" in files:
                rel = os.path.relpath(dp, os.path.join(REPO_ROOT, folder))
                found.add(pkg if rel == "." else ".".join([pkg, *rel.split(os.sep)]))
    assert found == listed


@pytest.mark.slow
@pytest.mark.triton
def test_parity_refuses_a_repository_of_another_checkpoint(exported, tmp_path, capsys):
    """(issue 19) not "MISMATCH at token 0": the weights digests say the repository is another model's."""
    from coordexp.client import cli
    from coordexp.fixtures.tiny import build_tiny_checkpoint

    other = tmp_path / "other"
    build_tiny_checkpoint(str(other), family="qwen3_vl", seed=1)
    rc = cli.main(["parity", "--ckpt", str(other), "--repo", exported[1], "--data",
                   os.path.join(REPO_ROOT, "data", "sample", "sample.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and "was exported from another checkpoint" in err, err
