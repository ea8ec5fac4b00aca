"""Where the `tritonserver` binary comes from: one on PATH (the official container) is preferred;
otherwise the one the `nvidia-pytriton` wheel carries (server 2.51 with the Python backend and a stub
per Python version), run with a private backend folder holding the stub for the running Python."""
from __future__ import annotations

import os
import shutil
import socket
import sys
from dataclasses import dataclass


class TritonError(RuntimeError):
    """Triton could not be started, or a model failed to load (message carries Triton's words)."""


@dataclass
class TritonInstall:
    binary: str
    backend_dir: str | None  # None: the binary's own default (container: /opt/tritonserver/backends)
    lib_dirs: list[str]
    source: str  # "PATH" or "nvidia-pytriton"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def find_triton(prefer_path: bool = True) -> TritonInstall:
    on_path = shutil.which("tritonserver")
    if prefer_path and on_path:
        return TritonInstall(binary=on_path, backend_dir=None, lib_dirs=[], source="PATH")
    try:
        import pytriton
    except ImportError:
        raise TritonError(
            "no tritonserver found: none on PATH and the nvidia-pytriton wheel is not installed "
            "(pip install 'coordexp-serve[server]', or run inside the Triton container)"
        ) from None
    root = os.path.join(os.path.dirname(pytriton.__file__), "tritonserver")
    binary = os.path.join(root, "bin", "tritonserver")
    libs = os.path.join(os.path.dirname(os.path.dirname(pytriton.__file__)), "nvidia_pytriton.libs")
    if not os.path.exists(binary):
        raise TritonError(f"nvidia-pytriton is installed but carries no server binary at {binary}")
    return TritonInstall(binary=binary, backend_dir=os.path.join(root, "backends"), lib_dirs=[libs],
                         source="nvidia-pytriton")


def _prepare_backend_dir(install: TritonInstall, workdir: str) -> str | None:
    """A backend folder whose python/ holds the wheel's backend plus the stub for this Python."""
    if install.backend_dir is None:
        return None
    src = os.path.join(install.backend_dir, "python")
    stub = os.path.join(os.path.dirname(install.backend_dir), "python_backend_stubs",
                        f"{sys.version_info.major}.{sys.version_info.minor}", "triton_python_backend_stub")
    if not os.path.exists(stub):
        raise TritonError(f"nvidia-pytriton has no Python-backend stub for Python "
                          f"{sys.version_info.major}.{sys.version_info.minor} ({stub})")
    dst = os.path.join(workdir, "backends", "python")
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name.endswith((".so", ".py")):
            os.symlink(os.path.join(src, name), os.path.join(dst, name))
    shutil.copy2(stub, os.path.join(dst, "triton_python_backend_stub"))
    return os.path.dirname(dst)
