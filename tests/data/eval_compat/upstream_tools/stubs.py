"""Scratch only: lets upstream's parser/evaluator import without its training stack (ms-swift, deepspeed...)."""
import importlib.abc, importlib.machinery, sys, types
from unittest import mock
STUB = ("swift", "deepspeed", "vllm", "peft", "trl", "wandb", "liger_kernel", "flash_attn", "accelerate", "qwen_vl_utils", "modelscope")
class _F(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in STUB:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
        m = mock.MagicMock(name=spec.name); m.__path__ = []; m.__spec__ = spec; return m
    def exec_module(self, m): pass
sys.meta_path.insert(0, _F())
sys.path.insert(0, "/tmp/up14")
