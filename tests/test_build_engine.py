"""`build_engine.py` for one's own checkpoint: the prompt variant it serves (flags, manifest, validation
with that prompt), the decoding flags of the ONNX llm steps, no second export of an unchanged
checkpoint, the next command after every build, and no silent overwrite of a served repository.

One real export of the tiny checkpoint (module fixture); everything else reuses it or stops before
exporting."""
from __future__ import annotations

import contextlib
import io
import json
import os

import pytest

from coordexp import wire
from coordexp.prompt import PromptSpec
from coordexp.serving import common as C

# the flags replace single values of the tiny checkpoint's training record (run variant "default")
PROMPT = PromptSpec(field_order="geometry_first", object_order="as_given", user_text="List the shapes.",
                    system_text="Find every shape.", run_variant="default")
ARGV = ["--field-order", "geometry_first", "--object-order", "as_given", "--prompt", "List the shapes.",
        "--system-prompt", "Find every shape.", "--llm-batching", "static", "--prefix-cache", "--no-jump-forward",
        "--max-new-tokens", "24", "--validation-steps", "4", "--threads", "2"]


def _argv(ckpt: str, repo: str, *extra: str) -> list[str]:
    return ["--ckpt", ckpt, "--repo", repo, *ARGV, *extra]


@pytest.fixture(scope="module")
def built(tiny_ckpt, tmp_path_factory):
    """(repo, stdout, stderr) of one real build with prompt and decoding flags."""
    from coordexp.export.build_engine import main

    repo = str(tmp_path_factory.mktemp("build") / "model_repository")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(_argv(tiny_ckpt, repo))
    assert rc == 0, err.getvalue()
    return repo, out.getvalue(), err.getvalue()


def _configs(repo: str) -> dict:
    from coordexp.export.model_configs import load_configs

    return load_configs(repo)


def _param(cfg, key: str) -> str:
    return cfg.parameters[key].string_value


@pytest.mark.slow
def test_the_prompt_flags_are_served_recorded_and_validated_with_that_prompt(built):
    repo, out, _ = built
    manifest = json.load(open(os.path.join(repo, C.MANIFEST)))
    assert manifest["prompt"] == PROMPT.to_dict()
    assert PROMPT.variant == "run:default/tokens/geometry_first/as_given"
    src = manifest["prompt_source"]
    assert src["source"] == "training_record" and src["overrides"] == [
        "--field-order", "--object-order", "--prompt", "--system-prompt"]
    assert manifest["prompt_template_hash"] == src["prompt_template_hash"] == PROMPT.template_hash()
    configs = _configs(repo)
    assert json.loads(_param(configs[wire.PREPROCESS], "prompt_json")) == PROMPT.to_dict()  # what preprocess encodes
    assert _param(configs[wire.ENSEMBLE], "prompt_variant") == PROMPT.variant
    # validation encoded its probes with the served prompt: the greedy tokens compared are that prompt's
    v = manifest["validation"]
    assert v["prompt"] == PROMPT.to_dict() and v["greedy_tokens_match"] and v["tokens_compared"] > 0
    assert f"prompt     : {PROMPT.variant} (from the training run's record" in out


@pytest.mark.slow
def test_the_decoding_flags_reach_the_llm_steps(built):
    repo, _, _ = built
    configs = _configs(repo)
    for model in (wire.LLM, wire.LLM_STREAM):  # the flags given, not the defaults (inflight, on, on)
        assert (_param(configs[model], "batching"), _param(configs[model], "prefix_cache"),
                _param(configs[model], "jump_forward")) == ("static", "true", "false")
    serving = json.load(open(os.path.join(repo, C.MANIFEST)))["serving"]
    assert (serving["llm_batching"], serving["prefix_cache"], serving["jump_forward"]) == ("static", True, False)


@pytest.mark.slow
def test_every_build_ends_with_the_command_that_serves_it(built):
    repo, out, _ = built
    lines = out.splitlines()
    assert f"serve it    : coordexp-server --repo {repo}" in lines
    assert lines[-1] == ("then, in a second terminal: coordexp-client infer --url 127.0.0.1:8001 --data YOUR.jsonl "
                         "--out predictions.jsonl")


@pytest.mark.slow
def test_an_unchanged_checkpoint_is_not_exported_again_and_a_change_says_what_differs(built, tiny_ckpt, capsys):
    from coordexp.export.build_engine import build_parser, check_flags, current_check, main, resolve_options

    repo, _, _ = built
    before = open(os.path.join(repo, C.MANIFEST)).read()
    assert main(_argv(tiny_ckpt, repo, "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"] and summary["repo"] == repo
    assert summary["reason"].startswith("same checkpoint (sha256 ") and "prompt" in summary["reason"]
    assert summary["next"][0] == f"serve it    : coordexp-server --repo {repo}"
    assert open(os.path.join(repo, C.MANIFEST)).read() == before  # not rewritten
    assert main(_argv(tiny_ckpt, repo)) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"skipped    : {repo} is current: same checkpoint")
    assert "--force to export anyway" in captured.out and "coordexp-server --repo" in captured.out

    def why(*extra: str) -> str:
        parser = build_parser()
        args = parser.parse_args(_argv(tiny_ckpt, repo, *extra))
        current, reason = current_check(resolve_options(args, check_flags(args, parser)))
        assert not current
        return reason

    assert why("--field-order", "desc_first").startswith(
        'prompt.field_order "geometry_first" in the repository, "desc_first" requested')
    assert why("--no-prefix-cache") == "serving.prefix_cache true in the repository, false requested"
    assert why("--max-batch-size", "4") == "max_batch_size 8 in the repository, 4 requested"
    assert why("--opset", "17").startswith("onnx.opset ")
    assert why("--name", "shapes").startswith('name "coordexp" in the repository, "shapes" requested')


def test_the_decoding_flags_default_to_serving_options_and_belong_to_onnx_and_torch(tiny_ckpt, tmp_path, capsys):
    from coordexp.export.build_engine import build_parser, check_flags, main, resolve_options, serving_options
    from coordexp.export.repository import ServingOptions

    parser = build_parser()
    args = parser.parse_args(["--ckpt", tiny_ckpt])
    opts = resolve_options(args, check_flags(args, parser))
    assert serving_options(opts) == ServingOptions()  # the lead flips the defaults there, in one place
    args = parser.parse_args(["--ckpt", tiny_ckpt, "--no-prefix-cache", "--jump-forward", "--llm-batching", "static",
                              "--no-stream"])
    s = serving_options(resolve_options(args, check_flags(args, parser)))
    assert (s.prefix_cache, s.jump_forward, s.llm_batching, s.streaming) == (False, True, "static", False)
    assert main(["--ckpt", tiny_ckpt, "--backend", "trtllm", "--no-prefix-cache", "--dry-run"]) == 2
    assert capsys.readouterr().err == "error: --prefix-cache applies to --backend onnx or torch only\n"
    # torch: in flight with the prefix cache and jump-forward by default; fixed shapes refuse joining rows
    args = parser.parse_args(["--ckpt", tiny_ckpt, "--backend", "torch", "--device", "cpu"])
    s = resolve_options(args, check_flags(args, parser)).torch.serving(True)
    assert (s.llm_batching, s.jump_forward, s.prefix_cache) == ("inflight", True, True)
    args = parser.parse_args(["--ckpt", tiny_ckpt, "--backend", "torch", "--device", "cpu", "--compile"])
    s = resolve_options(args, check_flags(args, parser)).torch.serving(True)
    assert (s.llm_batching, s.jump_forward, s.prefix_cache) == ("static", False, False)
    args = parser.parse_args(["--ckpt", tiny_ckpt, "--backend", "torch", "--device", "cpu", "--no-prefix-cache"])
    assert not resolve_options(args, check_flags(args, parser)).torch.serving(True).prefix_cache
    for extra, needle in ((["--compile", "--llm-batching", "inflight"], "--llm-batching inflight needs the dynamic"),
                          (["--llm-batching", "static", "--prefix-cache"], "--prefix-cache with --backend torch needs"),
                          (["--kv-cache", "static", "--llm-batching", "inflight"], "rows cannot join"),
                          (["--compile", "--jump-forward"], "--jump-forward does not work with --compile")):
        assert main(["--ckpt", tiny_ckpt, "--backend", "torch", "--device", "cpu", *extra, "--dry-run"]) == 2
        assert needle in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--field-order", "sideways"],
     "argument --field-order: invalid choice: 'sideways' (choose from 'desc_first', 'geometry_first')"),
    (["--coord-format", "float"], "argument --coord-format: invalid choice: 'float' (choose from 'tokens', 'numeric')"),
    (["--object-order", "shuffled"], "argument --object-order: invalid choice: 'shuffled' (choose from 'sorted', 'as_given', 'random')"),
])
def test_a_bad_prompt_choice_exits_2_naming_the_flag_and_the_allowed_values(tiny_ckpt, capsys, argv, message):
    from coordexp.export.build_engine import main

    with pytest.raises(SystemExit) as e:
        main(["--ckpt", tiny_ckpt, "--dry-run", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_prompt_flags_are_checked_before_anything_is_done(tiny_ckpt, tmp_path, capsys):
    from coordexp.export.build_engine import main

    repo = tmp_path / "r"
    assert main(["--ckpt", tiny_ckpt, "--repo", str(repo), "--prompt", "  "]) == 2
    assert capsys.readouterr().err == "error: --prompt is empty: give the text, or leave the flag out\n"
    assert main(["--ckpt", tiny_ckpt, "--repo", str(repo), "--coord-format", "numeric", "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == "run:default/numeric/desc_first/sorted"
    assert main(["--ckpt", tiny_ckpt, "--repo", str(repo), "--opset", "18", "--backend", "torch", "--dry-run"]) == 2
    assert capsys.readouterr().err == "error: --opset applies to --backend onnx only\n"
    assert not repo.exists()


@pytest.mark.slow
@pytest.mark.triton
def test_a_repository_a_server_serves_is_not_replaced_and_the_refusal_names_the_server(server, tiny_ckpt, capsys):
    from coordexp.export.build_engine import main

    repo = server.repo
    before = open(os.path.join(repo, C.MANIFEST)).read()
    # another token limit: not current, so it would export; refused before the (minute-long) export
    assert main(["--ckpt", tiny_ckpt, "--repo", repo, "--max-new-tokens", "16", "--skip-validation"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {repo} is being served by coordexp-server pid {os.getpid()} "
                          f"(tritonserver pid {server.proc.pid}; grpc 127.0.0.1:{server.grpc_port}, "
                          f"http 127.0.0.1:{server.http_port}; since ")
    assert "pass --force (the running server keeps the old model until it is restarted)" in err
    assert open(os.path.join(repo, C.MANIFEST)).read() == before and server.proc.poll() is None


@pytest.mark.slow
def test_the_torch_backend_validates_and_serves_the_same_prompt(tiny_ckpt, tmp_path, capsys):
    from coordexp.export.build_engine import main

    repo = str(tmp_path / "torch")
    assert main(["--ckpt", tiny_ckpt, "--backend", "torch", "--device", "cpu", "--dtype", "fp32", "--repo", repo,
                 "--field-order", "geometry_first", "--object-order", "as_given", "--prompt", "List the shapes.",
                 "--system-prompt", "Find every shape.", "--max-new-tokens", "8", "--validation-steps", "3"]) == 0
    assert f"prompt     : {PROMPT.variant}" in capsys.readouterr().out
    manifest = json.load(open(os.path.join(repo, C.MANIFEST)))
    assert manifest["prompt"] == PROMPT.to_dict() and manifest["backend"] == "torch"
    v = manifest["validation"]
    assert v["prompt"] == PROMPT.to_dict() and v["mismatches"] == [] and v["tokens_compared"] > 0
    assert json.loads(_configs(repo)[wire.PREPROCESS].parameters["prompt_json"].string_value) == PROMPT.to_dict()


def test_an_export_hashes_the_weights_once(tiny_ckpt, tmp_path, monkeypatch):
    """Export, validation and the repository writer all need the checkpoint's digest: the weights
    are read for it once (a 2B checkpoint is 8 GB), counted on the real export path."""
    import coordexp.checkpoint as ck
    from coordexp.export.build_engine import main

    monkeypatch.setattr(ck, "_DIGESTS", {})
    hashed = []
    real = ck.sha256_file
    monkeypatch.setattr(ck, "sha256_file", lambda path, *a, **k: (hashed.append(os.path.basename(path)),
                                                                  real(path, *a, **k))[1])
    assert main(["--ckpt", tiny_ckpt, "--repo", str(tmp_path / "repo"), "--max-new-tokens", "8",
                 "--validation-steps", "4"]) == 0
    assert hashed == [p.name for p in ck.weight_files(tiny_ckpt)]
    manifest = json.load(open(tmp_path / "repo" / "manifest.json"))
    assert manifest["checkpoint"]["weights_sha256"] == real(os.path.join(tiny_ckpt, "model.safetensors"))
    # a changed weights file is hashed again (the memo keys on size and mtime)
    weights = os.path.join(tiny_ckpt, "model.safetensors")
    st = os.stat(weights)
    try:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
        ck.checkpoint_digest(tiny_ckpt)
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert len(hashed) == 2
