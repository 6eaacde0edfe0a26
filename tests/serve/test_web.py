"""--format web in a real browser: Debian's Chromium, headless, driven by puppeteer-core
(web/drive.mjs), loads the page from `serve-web`'s server and generates with
onnxruntime-web; the token ids and the first steps' logits equal native onnxruntime's on
the same graphs, on one wasm thread and on several when the page is cross-origin isolated."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import print_uncaptured, prompt_of, run_cli

from bsbr_export.export.pipeline import export_model
from bsbr_export.formats import FORMATS
from bsbr_export.manifest import read_manifest
from bsbr_export.model.spec import ModelSpec
from bsbr_export.runtime.batching import Sequences
from bsbr_export.runtime.onnx import OnnxRunner
from bsbr_export.runtime.state import advance_state, empty_state_tensor
from bsbr_export.serve.web import page_server, serve_in_thread

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "web" / "drive.mjs"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
TOLERANCE = 1e-4  # x logit scale, as every other parity check
VOCAB = 97  # bsbr-tiny


def _skip_unless_ci(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the browser tests: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def browser():
    """What driving the page needs: node, web/node_modules (npm ci --prefix web), Chromium."""
    if not shutil.which("node"):
        _skip_unless_ci("no node")
    if not (ROOT / "web" / "node_modules" / "puppeteer-core").is_dir():
        _skip_unless_ci("no web/node_modules: run `npm ci --prefix web`")
    if not Path(CHROMIUM).is_file():
        _skip_unless_ci(f"no Chromium at {CHROMIUM}: apt-get install chromium")
    return CHROMIUM


@pytest.fixture(scope="session")
def web_export(tmp_path_factory):
    """The page of bsbr-tiny-gated (retrieval form `gated`); the decode-only page below is
    of a module with form `sum`, so the browser runs both."""
    out = tmp_path_factory.mktemp("web") / "bsbr-tiny-gated"
    export_model("bsbr-tiny-gated", out, [FORMATS["web"]], streaming=True)
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["one-thread", "isolated"])
def page(request, web_export):
    """The page served on a free 127.0.0.1 port, without and with cross-origin isolation."""
    server = page_server(web_export, 0, isolated=request.param)
    serve_in_thread(server)
    yield f"http://127.0.0.1:{server.server_address[1]}/", request.param
    server.shutdown()
    server.server_close()


def drive(url: str, options: dict, *extra: str, env: dict | None = None) -> dict:
    done = subprocess.run(
        ["node", str(DRIVER), url, json.dumps(options), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "CHROMIUM": CHROMIUM, **(env or {})},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def native_greedy(web: Path, prompt: list[int], tokens: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy generation on native onnxruntime over the page's own decode graph."""
    spec = ModelSpec.from_dict(read_manifest(web.parent)["spec"])
    runner = OnnxRunner(web / "model.decode.onnx")
    state = {name: empty_state_tensor(shape, 1) for name, shape in spec.state.inputs.items()}
    feed, ids, logits = prompt, [], []
    for _ in range(tokens):
        out = runner.infer({"input_ids": np.array([feed], np.int64), **state})
        row = out["logits"][0, -1]
        logits.append(row)
        ids.append(int(row.argmax()))
        state = advance_state(state, out, spec.state.append_axis)
        feed = [ids[-1]]
    return ids, logits


def test_export_writes_the_page_graphs_and_runtime(web_export):
    web = web_export / "web"
    manifest = read_manifest(web_export)  # every file's sha256 checked
    names = {a["name"]: a for a in manifest["artifacts"]}
    assert set(names) == {"web/model.onnx", "web/model.rows.onnx", "web/model.decode.onnx"}
    files = set().union(*(names[n]["files"] for n in names))
    assert {
        "web/index.html",
        "web/app.js",
        "web/web.json",
        "web/ort/ort.wasm.min.mjs",
        "web/ort/ort-wasm-simd-threaded.wasm",
        "web/ort/ort.webgpu.min.mjs",
    } <= files
    import onnx

    for graph in ("model.onnx", "model.rows.onnx", "model.decode.onnx"):
        opset = {o.domain: o.version for o in onnx.load(str(web / graph), load_external_data=False).opset_import}
        assert opset[""] == 18
    facts = json.loads((web / "web.json").read_text())
    assert facts["vocab_size"] == VOCAB
    assert facts["graphs"] == {"full": "model.onnx", "rows": "model.rows.onnx", "decode": "model.decode.onnx"}
    assert set(facts["files"]) == set(facts["graphs"].values())
    for page in ("index.html", "app.js"):  # nothing fetched from elsewhere (no CDN)
        assert "http://" not in (web / page).read_text() and "https://" not in (web / page).read_text()


def worst_error(got: list, want: list[np.ndarray]) -> float:
    """The largest logit difference over steps, relative to each step's logit scale."""
    return max(float(np.abs(np.array(g, np.float32) - w).max() / max(1.0, np.abs(w).max())) for g, w in zip(got, want))


def test_sequences_run_the_page_graphs_as_the_page_does(web_export):
    """runtime.batching over web/'s graphs (tools/web_load.py's native engine): the row step
    and the decode step in turn give the decode step's own logits."""
    sequences = Sequences(web_export, capacity=1, graphs="web")
    prompt = prompt_of(13, VOCAB)
    ids, want = native_greedy(web_export / "web", prompt, 24)
    got = [sequences.open(0, prompt)[-1]]
    got += [sequences.feed({0: [token]})[0][-1] for token in ids[:-1]]
    assert worst_error(got, want) <= TOLERANCE


def test_the_page_generates_what_native_onnxruntime_generates(browser, page, web_export, request):
    """24 greedy tokens after a 13-token prompt (c = 8: chunks close on the way, so both the
    row step and the decode step run): the same ids as native onnxruntime's decode step
    alone, and all 24 steps' logits within 1e-4 x their scale."""
    url, isolated = page
    prompt = prompt_of(13, VOCAB)
    result = drive(url, {"prompt": prompt, "tokens": 24, "keepLogits": 24})
    assert "error" not in result, result
    assert result["backend"] == "wasm" and result["isolated"] is isolated
    assert (result["threads"] > 1) is isolated or os.cpu_count() == 1
    # the prompt, then tokens at positions 15, 23, 31 close their chunks: 4 decode steps
    assert result["graphs"] == {"decode": 4, "rows": 20}
    ids, logits = native_greedy(web_export / "web", prompt, 24)
    assert result["ids"] == ids
    worst = worst_error(result["logits"], logits)
    assert len(result["logits"]) == 24 and worst <= TOLERANCE
    print_uncaptured(
        request,
        f"browser wasm ({result['threads']} thread(s)): {result['token_ms']:.2f} ms/token, "
        f"max error {worst:.1e} x scale, page load {result['load_ms']:.0f} ms",
    )


def test_webgpu_where_the_browser_gives_an_adapter(browser, page, web_export, request):
    url, isolated = page  # both pages: the isolated one runs wasm threaded beside WebGPU
    prompt = prompt_of(13, VOCAB)
    result = drive(
        url, {"prompt": prompt, "tokens": 24, "keepLogits": 24, "backend": "webgpu"}, env={"BSBR_WEBGPU": "1"}
    )
    assert "error" not in result, result
    if result["backend"] != "webgpu":  # only a missing adapter may skip; a failing run fails
        assert "WebGPU unavailable" in result["note"], result["note"]
        pytest.skip(f"no WebGPU here: {result['note']}")
    assert result["graphs"] == {"decode": 4, "rows": 20} and not result["note"]
    assert result["cache"] == "gpu-buffer"  # the row step's caches stay on the GPU between calls
    ids, logits = native_greedy(web_export / "web", prompt, 24)
    assert result["ids"] == ids
    worst = worst_error(result["logits"], logits)
    assert worst <= TOLERANCE
    print_uncaptured(
        request,
        f"browser WebGPU (row step{', isolated page' if isolated else ''}): {result['token_ms']:.2f} ms/token, "
        f"max error {worst:.1e} x scale",
    )


def test_a_module_without_a_row_step_generates_with_the_decode_step(browser, hf_model_dir, tmp_path):
    """A module with stream_update but no step_rows (a transformers model on BSBRAttention):
    web/ has no row step, the page generates with the decode step alone, and asked for
    WebGPU it says why it stayed on wasm."""
    out = tmp_path / "lm"
    export_model(str(hf_model_dir), out, [FORMATS["web"]], streaming=True, trust_code=True)
    facts = json.loads((out / "web" / "web.json").read_text())
    assert "rows" not in facts["graphs"] and not (out / "web" / "model.rows.onnx").exists()
    server = page_server(out, 0)
    serve_in_thread(server)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    prompt = prompt_of(11, facts["vocab_size"])
    try:
        wasm = drive(url, {"prompt": prompt, "tokens": 10})
        webgpu = drive(url, {"prompt": prompt, "tokens": 10, "backend": "webgpu"}, env={"BSBR_WEBGPU": "1"})
    finally:
        server.shutdown()
        server.server_close()
    ids, _ = native_greedy(out / "web", prompt, 10)
    assert wasm["ids"] == ids and wasm["graphs"] == {"rows": 0, "decode": 10}
    assert webgpu["ids"] == ids and webgpu["backend"] == "wasm"
    assert webgpu["note"] in (
        "WebGPU runs the row step only, and this export has none: fell back to wasm",
        "WebGPU unavailable (requestAdapter() gave no adapter): fell back to wasm",
    )


def test_the_page_after_generation(browser, page, tmp_path, request):
    """The form, as a person uses it: ids typed in, Generate pressed, tokens shown with
    their speed, on the one-thread page and the isolated (threaded) one; the screenshots
    are kept (BSBR_TEST_ARTIFACTS, else the test's tmp dir)."""
    url, isolated = page
    target = Path(os.environ.get("BSBR_TEST_ARTIFACTS", tmp_path)) / f"web_page{'-isolated' if isolated else ''}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    result = drive(url, {"text": "5, 17, 3, 60", "tokens": 20}, "--ui", str(target))
    assert result["status"] == "Done.", result
    assert result["output"].startswith("5, 17, 3, 60") and len(result["output"].split()) >= 20
    assert "tokens/s" in result["stats"] and "ms per token" in result["stats"]
    assert target.stat().st_size > 10_000 and target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print_uncaptured(request, f"web page screenshot: {target}")


@pytest.mark.parametrize(
    "prompt, message",
    [
        ([1, 97], "token id 97 is out of range"),
        ([], "the prompt is empty"),
    ],
)
def test_a_bad_prompt_is_a_message_on_the_page(browser, page, prompt, message):
    url, _ = page
    result = drive(url, {"prompt": prompt, "tokens": 4})
    assert message in result["error"] and not result["errors"]


def test_a_changed_or_missing_graph_is_a_message_on_the_page(browser, web_export, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(web_export, copy)
    graph = copy / "web" / "model.decode.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    server = page_server(copy, 0)
    serve_in_thread(server)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        changed = drive(url, {"prompt": [1, 2], "tokens": 2})
        graph.unlink()
        missing = drive(url, {"prompt": [1, 2], "tokens": 2})
    finally:
        server.shutdown()
        server.server_close()
    assert "model.decode.onnx does not match the sha256 in web.json" in changed["error"]
    assert "could not load model.decode.onnx (HTTP 404)" in missing["error"]


# ---- serve-web and export, as commands -------------------------------------------------------


def test_serve_web_sends_the_isolation_headers_and_stops_on_ctrl_c(web_export):
    process = subprocess.Popen(
        [sys.executable, "-m", "bsbr_export.cli", "serve-web", str(web_export), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = process.stdout.readline()
        url = line.split(" at ", 1)[1].split()[0]
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "ort/ort-wasm-simd-threaded.wasm", timeout=10) as response:
            assert response.headers["Cross-Origin-Opener-Policy"] == "same-origin"
            assert response.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
            assert response.headers["Content-Type"] == "application/wasm"
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 130
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_web_of_a_directory_without_a_page(capsys, tmp_path):
    code, _, err = run_cli(capsys, "serve-web", str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "has no web page (index.html)" in err


def test_format_web_without_onnxruntime_web_files_writes_nothing(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("BSBR_ORT_WEB", str(tmp_path / "nowhere"))
    code, _, err = run_cli(
        capsys, "export", "bsbr-tiny", "--format", "web", "--streaming", "--out", str(tmp_path / "out")
    )
    assert code == 2 and err.count("\n") == 1 and "onnxruntime-web's files are needed for the web format" in err
    assert not (tmp_path / "out").exists()


def test_a_graph_onnxruntime_web_cannot_run_is_refused_naming_the_op(browser, tmp_path):
    """The web format's runner is onnxruntime-web itself (wasm, under Node), so export and
    validate refuse a graph it cannot run, with its message naming the op."""
    import onnx
    from onnx import TensorProto, helper

    from bsbr_export.errors import UserError
    from bsbr_export.runtime.ortweb import OrtWebRunner

    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)], ir_version=10
    )
    onnx.save(model, tmp_path / "odd.onnx")
    with pytest.raises(UserError, match="onnxruntime-web cannot load odd.onnx: .*Frobnicate"):
        OrtWebRunner(tmp_path / "odd.onnx")


def test_validate_runs_the_web_graphs_in_onnxruntime_web(browser, web_export, capsys):
    code, out, _ = run_cli(capsys, "validate", str(web_export))
    assert code == 0
    assert all(f"web/model.{kind}onnx" in out for kind in ("", "rows.", "decode."))


def test_format_web_implies_the_page_graphs_without_streaming(capsys, tmp_path):
    """`export MODEL --format web` as written: the page's row and decode steps come with it,
    their state in the manifest, so the page's graphs generate natively too."""
    code, _, err = run_cli(capsys, "export", "bsbr-tiny", "--format", "web", "--out", str(tmp_path / "out"))
    assert code == 0, err
    written = {p.name for p in (tmp_path / "out" / "web").glob("*.onnx")}
    assert written == {"model.onnx", "model.rows.onnx", "model.decode.onnx"}
    sequences = Sequences(tmp_path / "out", capacity=1, graphs="web")
    assert sequences.open(0, prompt_of(9, VOCAB)).shape == (9, VOCAB)


def test_format_web_of_a_module_that_cannot_stream_is_refused(capsys, tmp_path):
    """A language model without the decode step gets one line, not a page that cannot generate."""
    (tmp_path / "lm.py").write_text(
        "from torch import nn\n"
        "from bsbr_export.nn import BSBRAttention\n\n"
        "class LM(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.embed, self.attn, self.head = nn.Embedding(50, 16), BSBRAttention(16, 2, 4), nn.Linear(16, 50)\n\n"  # noqa: E501
        "    def forward(self, input_ids):\n"
        "        return self.head(self.attn(self.embed(input_ids)))\n\n"
        "def build():\n"
        "    return LM().eval()\n"
    )
    code, _, err = run_cli(
        capsys,
        "export",
        f"{tmp_path / 'lm.py'}:build",
        "--trust-code",
        "--format",
        "web",
        "--streaming",
        "--out",
        str(tmp_path / "out"),
    )
    assert code == 2 and err.count("\n") == 1 and "--format web needs the decode step, which LM cannot give" in err
    assert not (tmp_path / "out").exists()
