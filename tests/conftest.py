"""Shared fixtures: tiny configs and models, seeded random inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bsbr_export import BSBRConfig, build_model

# Two pytest-xdist workers share the machine's cores (`make test`): eager torch in each
# computes on one thread, so the two never wait on each other's spinning thread pools. A
# worker starts with COLUMNS=80 in its environment, which would cut the CLI's tables as a
# terminal that narrow does; the tests read them as printed off a terminal.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ.pop("COLUMNS", None)

# The lengths where chunked code breaks: one token, around one chunk, a ragged tail.
EDGE_LENGTHS = {
    "1": lambda c: 1,
    "c-1": lambda c: max(c - 1, 1),
    "c": lambda c: c,
    "c+1": lambda c: c + 1,
    "3c+5": lambda c: 3 * c + 5,
}

TINY = dict(vocab_size=61, hidden_size=16, num_layers=2, num_heads=2, chunk_size=4, ff_size=32)


def tiny_config(**overrides) -> BSBRConfig:
    """A config small enough for float64 property tests."""
    return BSBRConfig(**{**TINY, **overrides})


def random_ids(config: BSBRConfig, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Token ids drawn from their own generator, so tests never share RNG state."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=generator)


@pytest.fixture(autouse=True)
def patient_first_step(monkeypatch):
    """Off a terminal the CLI prints its first step's line after a 1 s grace, so an error
    found while loading stays the only line; on a machine loaded by the other test worker
    loading may take longer, and the tests that read stderr as one line would see two."""
    from bsbr_export import render

    monkeypatch.setattr(render, "FIRST_STEP_GRACE_S", 60.0)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run `bsbr-export ARGS` in-process: (exit status, stdout, stderr)."""
    from bsbr_export.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(params=[None, 5], ids=["plain", "compressed"])
def tiny_model(request):
    """A float64 tiny model, with and without chunk-state compression."""
    return build_model(tiny_config(compression=request.param), seed=1).double()


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """bsbr-tiny exported once per session: ONNX + TorchScript (+ mobile), full and streaming."""
    from bsbr_export.export.pipeline import export_model
    from bsbr_export.formats import FORMATS

    out = tmp_path_factory.mktemp("exports") / "bsbr-tiny"
    formats = [FORMATS[name] for name in ("onnx", "torchscript", "torchscript-mobile")]
    result = export_model("bsbr-tiny", out, formats, streaming=True)
    return out, result


@pytest.fixture(scope="session")
def aoti_export(tmp_path_factory):
    """bsbr-tiny compiled once per session with AOTInductor (the full graph and, with
    `streaming`, the decode step): compiling is slow, so no other fixture does it."""
    from bsbr_export.export.pipeline import export_model
    from bsbr_export.formats import FORMATS

    out = tmp_path_factory.mktemp("exports") / "bsbr-tiny-aoti"
    result = export_model("bsbr-tiny", out, [FORMATS["aoti"]], streaming=True)
    return out, result


# The ExecuTorch program's limits in tests: a length that is no chunk multiple, and a
# batch above the validation batches (memory is planned for these, so small is quick).
EXECUTORCH_LIMITS = {"max_length": 77, "max_batch": 3}


@pytest.fixture(scope="session")
def executorch_export(tmp_path_factory):
    """bsbr-tiny lowered once per session to an ExecuTorch program (XNNPACK): lowering
    takes most of a minute, so no other fixture does it. Skips without the extra."""
    pytest.importorskip("executorch", reason='the executorch extra is not installed (pip install ".[executorch]")')
    from bsbr_export.export.pipeline import export_model
    from bsbr_export.formats import FORMATS

    out = tmp_path_factory.mktemp("exports") / "bsbr-tiny-executorch"
    result = export_model("bsbr-tiny", out, [FORMATS["executorch"]], streaming=True, **EXECUTORCH_LIMITS)
    return out, result


@pytest.fixture(scope="session")
def compressed_export(tmp_path_factory):
    """bsbr-tiny-compressed exported once per session (ONNX only, full and streaming)."""
    from bsbr_export.export.pipeline import export_model
    from bsbr_export.formats import FORMATS

    out = tmp_path_factory.mktemp("exports") / "bsbr-tiny-compressed"
    result = export_model("bsbr-tiny-compressed", out, [FORMATS["onnx"]], streaming=True)
    return out, result


@pytest.fixture(scope="session")
def tiny_onnx_export(tmp_path_factory):
    """bsbr-tiny exported once per session as model.onnx alone: the cheapest real export dir."""
    from bsbr_export.export.pipeline import export_model
    from bsbr_export.formats import FORMATS

    out = tmp_path_factory.mktemp("exports") / "bsbr-tiny-onnx"
    export_model("bsbr-tiny", out, [FORMATS["onnx"]])
    return out


@pytest.fixture(scope="session")
def stdlib_export(tmp_path_factory):
    """The trained byte-level preset exported to ONNX once per session, with a small
    held-out text file. Tests that write into it take `stdlib_copy`."""
    from bsbr_export.export.pipeline import export_model
    from bsbr_export.formats import FORMATS
    from bsbr_export.proof.evaltext import heldout_text

    out = tmp_path_factory.mktemp("stdlib") / "bsbr-stdlib"
    export_model("bsbr-stdlib", out, [FORMATS["onnx"]])
    text = out.parent / "heldout.py"
    text.write_bytes(heldout_text(3000))
    return out, text


@pytest.fixture(scope="session")
def stdlib_streaming_export(tmp_path_factory):
    """The trained byte-level preset exported to ONNX with its streaming, decode and row
    graphs, once per session."""
    from bsbr_export.export.pipeline import export_model
    from bsbr_export.formats import FORMATS

    out = tmp_path_factory.mktemp("stdlib-streaming") / "bsbr-stdlib"
    export_model("bsbr-stdlib", out, [FORMATS["onnx"]], streaming=True)
    return out


TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture
def run_study(tmp_path):
    """A study's smoke run: `python tools/STUDY.py --smoke --out TMP ARGS...`, as a user
    runs it; its result (`NAME.json`, NAME the study's unless given) and report (`NAME.md`)."""

    def run(study: str, *args, name: str | None = None, timeout: float = 600) -> tuple[dict, str]:
        command = [sys.executable, str(TOOLS / f"{study}.py"), "--smoke", "--out", str(tmp_path), *map(str, args)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{study} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        name = name or study
        return json.loads((tmp_path / f"{name}.json").read_text()), (tmp_path / f"{name}.md").read_text()

    return run


@pytest.fixture
def stdlib_copy(stdlib_export, tmp_path):
    """A private copy of the session's bsbr-stdlib export (and its text file)."""
    import shutil

    out, text = stdlib_export
    shutil.copytree(out, tmp_path / "bsbr-stdlib")
    return tmp_path / "bsbr-stdlib", text


@pytest.fixture
def export_copy(tiny_export, tmp_path):
    """A private copy of the session's bsbr-tiny export, for tests that change it."""
    import shutil

    out, _ = tiny_export
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    return copy


def rehash(directory, name):
    """Record a file's new hash, as a broken exporter would have."""
    from bsbr_export.manifest import sha256

    manifest = json.loads((directory / "manifest.json").read_text())
    for artifact in manifest["artifacts"]:
        if name in artifact["files"]:
            artifact["files"][name]["sha256"] = sha256(directory / name)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def weight_used_only_in(proto, scope: str, block_path: str = "blocks", skip: str = "meta_"):
    """An initializer (matrix) that only nodes of `scope` read (equal constants are shared),
    skipping names with `skip`: a random-weight model's meta projections barely move its outputs."""
    from bsbr_export.proof.localize import block_scope

    readers = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(block_scope(node, block_path))
    return next(
        i for i in proto.graph.initializer if len(i.dims) == 2 and readers.get(i.name) == {scope} and skip not in i.name
    )


def print_uncaptured(request, text: str) -> None:
    """Print past pytest's capture: figures worth seeing in CI's log."""
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print(f"\n{text}")


HF_MODELING = Path(__file__).parent / "fixtures" / "hf" / "modeling_bsbr_lm.py"


def hf_modeling():
    """tests/fixtures/hf/modeling_bsbr_lm.py imported as `modeling_bsbr_lm`, the name
    save_pretrained's `auto_map` records (once per process)."""
    import importlib.util
    import sys

    if "modeling_bsbr_lm" not in sys.modules:
        spec = importlib.util.spec_from_file_location("modeling_bsbr_lm", HF_MODELING)
        module = importlib.util.module_from_spec(spec)
        sys.modules["modeling_bsbr_lm"] = module
        spec.loader.exec_module(module)
        module.BSBRLMConfig.register_for_auto_class()
        module.BSBRForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    return sys.modules["modeling_bsbr_lm"]


def train_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained here with the tokenizers library on the standard
    library's json package, with an <|endoftext|> special token (id 0)."""
    import json as json_package

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    sources = sorted(Path(json_package.__file__).parent.glob("*.py"))
    tokenizer.train_from_iterator([p.read_text() for p in sources], trainer)
    return tokenizer


def save_hf_model(directory: Path, tokenizer=None, **save_options):
    """A `BSBRForCausalLM` (seed 0) saved with save_pretrained into `directory` (config.json
    with auto_map, its modeling file, the weights), and `tokenizer` as tokenizer.json beside
    it. Returns the model that was saved."""
    modeling = hf_modeling()
    config = (
        {"vocab_size": tokenizer.get_vocab_size(), "eos_token_id": tokenizer.token_to_id("<|endoftext|>")}
        if tokenizer
        else {}
    )
    torch.manual_seed(0)
    model = modeling.BSBRForCausalLM(modeling.BSBRLMConfig(**config)).eval()
    model.save_pretrained(directory, **save_options)
    if tokenizer is not None:
        tokenizer.save(str(directory / "tokenizer.json"))
    return model


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory) -> Path:
    """A Hugging Face model directory written by save_pretrained, with its own modeling
    file (BSBR attention, rotary positions, grouped-query heads) and a tokenizer.json."""
    directory = tmp_path_factory.mktemp("hf") / "bsbr-lm"
    save_hf_model(directory, train_tokenizer())
    return directory


@pytest.fixture(scope="session")
def hf_export(hf_model_dir, tmp_path_factory):
    """`hf_model_dir` exported once per session (ONNX + TorchScript, full and streaming)."""
    from bsbr_export.export.pipeline import export_model
    from bsbr_export.formats import FORMATS

    out = tmp_path_factory.mktemp("exports") / "bsbr-lm"
    export_model(str(hf_model_dir), out, [FORMATS["onnx"], FORMATS["torchscript"]], streaming=True, trust_code=True)
    return out


def prompt_of(length: int, vocab_size: int) -> list[int]:
    """A deterministic prompt of `length` ids."""
    return [(11 * i + 5) % vocab_size for i in range(length)]


def eager_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding the slow, obviously right way: the whole sequence, every step."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.fixture(scope="session")
def triton_env():
    """The serving venv ($BSBR_TRITON_ENV, else .venv-triton in the checkout, which
    .ci/run creates). Without one the Triton tests skip, except under CI (`CI` set)."""
    from bsbr_export.errors import UserError
    from bsbr_export.serve.serve import ENV_VAR, find_env

    try:
        return find_env(os.environ.get(ENV_VAR) or Path(__file__).resolve().parents[1] / ".venv-triton")
    except UserError as exc:
        _skip_unless_ci(f"no Triton server: {exc}")


def _skip_unless_ci(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the Triton tests: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def triton_repo(tiny_export, tmp_path_factory) -> Path:
    """bsbr-tiny's --triton-repo, written once per session."""
    from bsbr_export.serve.triton import write_triton_repo

    out, _ = tiny_export
    return write_triton_repo(out, tmp_path_factory.mktemp("triton") / "models")


@pytest.fixture(scope="module")
def triton_server(triton_env, triton_repo, request):
    """A real tritonserver over `triton_repo` on free 127.0.0.1 ports, one per test
    module, stopped by its pid afterwards. Its start time is printed."""
    from bsbr_export.errors import UserError
    from bsbr_export.serve.serve import TritonServer

    server = TritonServer(triton_repo, triton_env, http_port=0, grpc_port=0)
    try:
        server.start()
    except UserError as exc:  # e.g. a glibc older than the wheel's manylinux_2_35
        _skip_unless_ci(f"the nvidia-pytriton server does not run here: {exc}")
    print_uncaptured(request, f"tritonserver ready in {server.start_seconds:.2f}s (pid {server.pid})")
    yield server
    server.stop()


# The `slow` marker (pyproject.toml): `make quick` runs `pytest -m "not slow"`, `make test`
# and CI everything. Chosen from measured durations (`--durations=0`) so that every test file
# outside SLOW_FILES keeps quick tests; the figures beside the entries are single-worker
# durations on 2-core machines. The whole suite took 39.7 min in one process and 26.0 min in
# two workers (2026-12-07, AMD EPYC, 2 cores).
# Whole files (by basename): each compiles, lowers or builds before its first test.
SLOW_FILES = (
    "test_aoti.py",  # AOTInductor compiles bsbr-tiny (aoti_export): 80 s
    "test_executorch.py",  # ExecuTorch lowering (executorch_export): 33 s
    "test_samples_cpp.py",  # a cmake build against libtorch, and the AOTInductor package: 16 s + aoti_export
    "test_pretrained.py",  # transformers model directories exported (hf_export 41 s, three more): 94 s
    "test_web.py",  # bsbr-tiny exported for the web (checked in onnxruntime-web) and driven in Chromium: 90 s
    "test_openai.py",  # serve-openai processes over stdlib_streaming_export, driven by the openai client: 4 min
    "test_proxy.py",  # two serve-openai processes behind nginx, one killed: 23 s + stdlib_streaming_export
)
# Every study's smoke run (tests/tools/) stays quick, whatever it costs (the largest:
# executorch_bench 133 s, byo_parity 75 s, web_load 45 s): `make quick` proves each study runs.
# Single tests: "file.py::test_name" matches that test (all its parameters), anything else
# is a substring of the node id. A fixture's setup is paid by its first user, so every user
# of an expensive fixture is listed, or the cost just moves to the next one.
SLOW_TESTS = (
    "test_export_module.py::test_bench_rebuilds_a_module_ref",  # 54 s
    "test_export_module.py::test_rotary_gqa_decoder_full_and_streaming",  # decoder_export: 40 s
    "test_export_module.py::test_a_broken_block_is_named_with_the_users_module_names",  # decoder_export
    "test_precision.py::test_compiled_autocast_runner_keeps_its_fp32_groups_at_unseen_lengths",  # torch.compile: 42 s
    "test_readme.py::test_readme_own_model_example_runs",  # 39 s
    "test_readme.py::test_readme_deploy_blocks_run_in_order",  # the marked blocks of README.md and docs/: minutes
    "compressed_export]",  # tests parametrized over compressed_export (its export: 20 s)
    "test_export.py::test_compressed_onnx_matches_eager",  # compressed_export
    "test_bench.py::test_int8_over_the_accuracy_budget_fails_and_is_never_recommended",  # 17 s + stdlib_export 10 s
    "test_bench.py::test_validate_scores_bits_per_byte_against_eager",  # stdlib_export
    "test_workflows.py::test_bench_makes_int8_judged_at_its_lengths_and_weighs_it",  # int8 search: 30 s
    "test_validate.py::test_reduced_precision_of_a_trained_lm_is_judged_by_its_loss_on_text",  # stdlib_copy
    "test_bench.py::test_quick_bench_exports_and_times_its_subset_and_explicit_flags_win",  # 15 s
    "test_cli_module.py::test_optimize_a_module_that_takes_no_mask",  # tokens_export: 20 s
    "test_cli_module.py::test_bench_feeds_what_the_spec_names",  # tokens_export
    "test_upstream.py::test_exports_match_package_at_unseen_lengths",  # 10 s
    "test_generate.py::test_byte_level_text_streams_as_it_comes",  # stdlib_streaming_export: 62 s
    "test_generate.py::test_a_user_modules_decode_graph_appends_finished_chunks",  # a module exported: 41 s
    "test_samples_streaming.py::test_text_through_the_exports_tokenizer_json",  # hf_export
    "test_batching.py::test_an_export_without_a_row_step_is_refused",  # hf_export
    "test_serve.py::test_idle_sequence_is_released",  # a second tritonserver, and an idle wait: 7 s
    "test_serve.py::test_a_module_without_a_row_step_streams_through_its_decode_graph",  # hf_export, a server
    "test_triton.py::test_python_streaming_config_without_row_step_keeps_state_in_the_model",  # hf_export
    "test_triton_generate.py::test_memory_is_back_after_ten_thousand_sequences",  # 10,000 sequences: 21 s
    "test_triton_generate.py::test_a_killed_server_restarted_refuses_old_sequences",  # two more servers
    "test_triton_generate.py::test_text_in_text_out_as_vllm_clients_send_it",  # stdlib_streaming_export
)


def _stale_slow_names() -> list[str]:
    """SLOW_FILES/SLOW_TESTS entries naming a test file or test function that is not there."""
    files = {path.name: path for path in Path(__file__).parent.rglob("test_*.py")}
    stale = [name for name in SLOW_FILES if name not in files]
    for entry in SLOW_TESTS:
        if "::" in entry:
            file, test = entry.split("::", 1)
            if file not in files or f"def {test}(" not in files[file].read_text():
                stale.append(entry)
    return stale


# `make test` runs the suite in two pytest-xdist workers (`--dist loadgroup`): the tests that
# share one of these fixtures, each a minute or more of exporting or lowering, go to one
# worker, so it is built once; cheaper session fixtures are built by each worker that needs them.
SHARED_IN_ONE_WORKER = (
    "stdlib_streaming_export",
    "aoti_export",
    "decoder_export",
    "executorch_export",
    "hf_export",
)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Mark SLOW_FILES' and SLOW_TESTS' tests `slow`; group the users of SHARED_IN_ONE_WORKER."""
    stale = _stale_slow_names()
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW_FILES/SLOW_TESTS name tests that do not exist: {stale}")
    for item in items:
        nodeid = "/" + item.nodeid
        if item.path.name in SLOW_FILES or any(
            ("/" + entry if "::" in entry else entry) in nodeid for entry in SLOW_TESTS
        ):
            item.add_marker(pytest.mark.slow)
        shared = next((name for name in SHARED_IN_ONE_WORKER if name in item.fixturenames), None)
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared))
