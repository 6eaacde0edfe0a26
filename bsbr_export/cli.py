"""`bsbr-export`: a thin command line over the library.

Each command parses its flags, makes one library call and renders the result.
Exit status: 0 ok, 1 a check failed, 2 a user error (one line on stderr), 130 Ctrl-C.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table

from bsbr_export.defaults import (
    DEFAULT_ACCURACY_BUDGET,
    DEFAULT_EVAL_WINDOWS,
    DEFAULT_OPSET,
    DEFAULT_THREADS,
    DEFAULT_TOKEN_BUDGET,
    DEFAULT_TOLERANCE,
    MAX_PROMPT_TOKENS,
    MAX_SEQUENCES,
)
from bsbr_export.errors import UserError
from bsbr_export.export.pipeline import export_model
from bsbr_export.formats import FORMATS, parse_formats
from bsbr_export.model.checkpoint import parameter_count, save_model
from bsbr_export.model.sources import load_module
from bsbr_export.model.spec import read_spec
from bsbr_export.model.upstream import NOT_CAUSAL
from bsbr_export.model.upstream import import_upstream as load_upstream
from bsbr_export.model.usercode import export_name
from bsbr_export.model.zoo import get_preset, list_presets
from bsbr_export.precisions import PRECISIONS
from bsbr_export.proof.doctor import diagnose
from bsbr_export.proof.evaltext import check_budget, read_eval_text
from bsbr_export.proof.optimize import optimize_export
from bsbr_export.proof.report import recommendation_text
from bsbr_export.proof.validate import validate_and_record
from bsbr_export.render import (
    bench_table,
    bf16_table,
    export_table,
    levels_table,
    progress_steps,
    quant_table,
    stdout_console,
    validation_table,
)
from bsbr_export.runtime.batching import Limits
from bsbr_export.runtime.engines import DEVICES
from bsbr_export.serve.openai import create_app
from bsbr_export.serve.openai import serve_openai as serve_openai_app
from bsbr_export.serve.serve import check_port
from bsbr_export.serve.serve import serve as run_server
from bsbr_export.serve.triton import check_triton_repo, write_triton_repo
from bsbr_export.serve.web import page_server, web_dir
from bsbr_export.summary import summarize
from bsbr_export.workflows import BenchExport, BenchOptions, benchmark

# Options several commands share, each declared once.
TRUST_CODE = click.option(
    "--trust-code",
    "trust_code",
    is_flag=True,
    help="Allow running a user's code: importing a module reference (file.py:factory) or a Hugging Face "
    "directory's modeling file, or rebuilding one from what an export's manifest records.",
)
TOLERANCE = click.option(
    "--tolerance",
    type=click.FloatRange(min=0),
    default=DEFAULT_TOLERANCE,
    show_default=True,
    help="Max abs error allowed, relative to the logit scale (max |logit|, at least 1).",
)
THREADS = click.option(
    "--threads", type=click.IntRange(min=1), default=DEFAULT_THREADS, show_default=True, help="Threads per engine."
)


def precision_options(command):
    """optimize's option per reduced precision (`precisions.PRECISIONS`): --NAME/--no-NAME,
    unset meaning the precision's default."""
    for precision in reversed(PRECISIONS):
        default = (
            f"when ONNX Runtime's {precision.provider} is available"
            if precision.provider
            else ("on" if precision.by_default else "off")
        )
        flag = precision.flag.removeprefix("--")
        command = click.option(
            f"--{flag}/--no-{flag}", precision.option, default=None, help=f"{precision.help} [default: {default}]"
        )(command)
    return command


def port_option(flag: str, default: int, what: str):
    """A server's port option (`what` says which port, and where): 0 asks for any free one."""
    return click.option(
        flag, type=click.IntRange(0, 65535), default=default, show_default=True, help=f"{what} (0: any free one)."
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bsbr-export")
def cli() -> None:
    """Export BSBR attention models to ONNX and TorchScript, and prove them right and fast."""


@cli.command()
@click.argument("name", required=False)
def models(name: str | None) -> None:
    """List the model zoo's presets, or show the preset NAME."""

    presets = [get_preset(name)] if name else list(list_presets().values())
    table = Table(title="bsbr-export model zoo" if not name else None)
    for column in ("name", "params", "hidden", "layers", "heads", "chunk", "compression", "weights"):
        table.add_column(column, justify="left" if column == "name" else "right", no_wrap=True)
    for preset in presets:
        cfg = preset.config
        table.add_row(
            preset.name,
            _human(parameter_count(cfg)),
            str(cfg.hidden_size),
            str(cfg.num_layers),
            str(cfg.num_heads),
            str(cfg.chunk_size),
            str(cfg.compression or "-"),
            _weights_text(preset),
        )
    console = stdout_console()
    console.print(table)
    if name:
        console.print(presets[0].description)


def _weights_text(preset) -> str:
    if preset.weights is None:
        return f"random (seed {preset.seed})"
    return "trained" + (f", {preset.heldout_bpb:.3f} bits/byte held out" if preset.heldout_bpb else "")


@cli.command()
@click.argument("model")
@click.option("--length", default=None, type=click.IntRange(min=1), help="Tokens per sequence [default: 4c+3].")
@click.option("--batch", default=2, show_default=True, type=click.IntRange(min=1), help="Sequences per batch.")
def run(model: str, length: int | None, batch: int) -> None:
    """Build MODEL (preset name or checkpoint directory), run it, and print a summary.

    Runs one full forward and the same tokens streamed in uneven pieces, and reports
    how far apart they are (they must agree: streaming equals parallel).
    """

    summary = summarize(model, length=length, batch=batch)
    stdout_console().print(summary.to_table())
    if not summary.passed:
        raise SystemExit(1)


@cli.command()
@click.argument("model")
@click.option("--out", "out_dir", type=click.Path(), default=None, help="Export directory [default: ./export/<model>].")
@click.option(
    "--format",
    "formats",
    default="onnx,torchscript",
    show_default=True,
    help="Comma-separated formats: " + ", ".join(FORMATS) + ".",
)
@click.option("--streaming", is_flag=True, help="Also export streaming-step graphs (past.* -> present.*).")
@click.option(
    "--static", "static", default=None, metavar="BATCHxLENGTH", help="Fixed-shape ONNX graph instead of dynamic axes."
)
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ONNX opset.")
@click.option(
    "--max-length",
    "max_length",
    type=click.IntRange(min=1),
    default=None,
    help="Longest input of an executorch program (memory is planned for it) [default: 2048].",
)
@click.option(
    "--max-batch",
    "max_batch",
    type=click.IntRange(min=1),
    default=None,
    help="Largest batch of an executorch program [default: 4].",
)
@click.option(
    "--device",
    "device",
    type=click.Choice(DEVICES),
    default=None,
    help="What an aoti package is compiled for [default: cpu]; cuda needs a CUDA build of torch and the GPU.",
)
@TOLERANCE
@click.option(
    "--force", is_flag=True, help="Replace a non-empty export directory (and Triton models of the same name)."
)
@click.option(
    "--triton-repo",
    "triton_repo",
    type=click.Path(),
    default=None,
    help="Also write the ONNX graphs as a Triton Inference Server model repository here.",
)
@TRUST_CODE
@click.option(
    "--weights",
    type=click.Path(),
    default=None,
    help="State dict to load into a module reference's module (.safetensors, or .pt with weights_only).",
)
@click.option(
    "--spec",
    "spec_file",
    type=click.Path(),
    default=None,
    help="JSON ModelSpec of a module reference's inputs/outputs [default: inferred].",
)
@click.option(
    "--chunk-size",
    "chunk_size",
    type=click.IntRange(min=1),
    default=None,
    help="Chunk size of a module with no BSBR layer to read it from.",
)
def export(
    model,
    out_dir,
    formats,
    streaming,
    static,
    opset,
    max_length,
    max_batch,
    device,
    tolerance,
    force,
    triton_repo,
    trust_code,
    weights,
    spec_file,
    chunk_size,
) -> None:
    """Export MODEL and check every artifact.

    MODEL is a preset name, a checkpoint directory, a Hugging Face model directory
    (save_pretrained's; its own modeling file needs --trust-code), or your own module as
    a reference `path/to/file.py:factory` / `package.module:factory` (a callable returning
    the nn.Module; needs --trust-code). Graphs that run only at the example's chunk count are
    refused before anything is written.

    Each artifact is compared with the eager model at lengths 1, c-1, c, c+1, 3c+5 and
    2048 (batches 1 and 3, plus a right-padded masked batch); any failure exits 1.
    With --triton-repo, artifacts that pass are laid out as Triton models: <model> and
    <model>_python (with --streaming also <model>_streaming and <model>_streaming_python);
    `bsbr-export serve` runs the _python ones.
    """

    chosen = parse_formats(formats)
    if triton_repo:
        if "onnx" not in [f.name for f in chosen]:
            raise UserError("--triton-repo serves the ONNX graph: add onnx to --format")
        check_triton_repo(Path(triton_repo), export_name(model), streaming, force)
    out = Path(out_dir) if out_dir else Path("export") / export_name(model)
    with progress_steps(Console(stderr=True)) as progress:
        result = export_model(
            model,
            out,
            chosen,
            spec=read_spec(spec_file) if spec_file else None,
            streaming=streaming,
            static_shape=_parse_static(static) if static else None,
            opset=opset,
            overwrite=force,
            tolerance=tolerance,
            trust_code=trust_code,
            weights=weights,
            chunk_size=chunk_size,
            max_length=max_length,
            max_batch=max_batch,
            device=device,
            progress=progress,
        )
    stdout_console().print(export_table(result))
    if result.note:
        click.echo(f"note: {result.note}")
    if not result.passed:
        for artifact in result.artifacts:
            for failure in artifact.parity.failures[:5]:
                click.echo(f"FAILED {artifact.name}: {failure}", err=True)
        raise SystemExit(1)
    if triton_repo:
        _echo_repo(write_triton_repo(out, triton_repo, overwrite=force))


def _echo_repo(repo: Path) -> None:
    click.echo(f"Triton model repository: {repo} (tritonserver --model-repository {repo})")


@cli.command("triton-repo")
@click.argument("export_dir", type=click.Path())
@click.argument("repo", type=click.Path())
@click.option("--force", is_flag=True, help="Replace Triton models of the same name in REPO.")
def triton_repo_command(export_dir, repo, force) -> None:
    """Lay out EXPORT_DIR's ONNX graphs (an export with --format onnx) as Triton models in
    REPO, as `export --triton-repo` does, without exporting again."""
    _echo_repo(write_triton_repo(export_dir, repo, overwrite=force))


# Byte-level language models are also judged by held-out text (validate, optimize, bench).
EVAL_TEXT = click.option(
    "--eval-text",
    "eval_text",
    type=click.Path(),
    default=None,
    help="UTF-8 file or directory to score byte-level LMs on (bits per byte) [default: held-out stdlib files].",
)
ACCURACY_BUDGET = click.option(
    "--accuracy-budget",
    "accuracy_budget",
    type=float,
    default=DEFAULT_ACCURACY_BUDGET,
    show_default=True,
    help="Largest relative rise of held-out bits per byte over eager that passes (0.01 = 1%).",
)


def _eval_text(path, budget: float) -> bytes | None:
    """--eval-text read and --accuracy-budget checked before any work (None: the default text)."""

    check_budget(budget)
    return read_eval_text(path) if path is not None else None


@cli.command()
@click.argument("export_dir", type=click.Path())
@TOLERANCE
@click.option(
    "--lengths",
    default=None,
    help="Comma-separated lengths [default: 1,c-1,c,c+1,3c+5,2048, up to an artifact's --max-length].",
)
@click.option(
    "--batches", default=None, help="Comma-separated batch sizes [default: 1,2,3, up to an artifact's --max-batch]."
)
@click.option("--provider", "providers", multiple=True, help="ONNX Runtime provider(s) [default: all available].")
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="cpu",
    show_default=True,
    help="cuda: ONNX graphs on the CUDA provider, TorchScript on the GPU.",
)
@TRUST_CODE
@EVAL_TEXT
@ACCURACY_BUDGET
def validate(
    export_dir, tolerance, lengths, batches, providers, device, trust_code, eval_text, accuracy_budget
) -> None:
    """Check every artifact in EXPORT_DIR against the eager model it came from.

    Writes EXPORT_DIR/validation.json. Exits 1 when any case fails, naming the case and,
    for ONNX graphs, the first block whose output diverges.
    """
    text = _eval_text(eval_text, accuracy_budget)
    with progress_steps(Console(stderr=True)) as progress:
        progress("validating every artifact against eager")
        result = validate_and_record(
            export_dir,
            tolerance=tolerance,
            lengths=_int_list(lengths, "--lengths") if lengths else None,
            batches=tuple(_int_list(batches, "--batches")) if batches else None,
            providers=list(providers) or None,
            trust_code=trust_code,
            eval_text=text,
            accuracy_budget=accuracy_budget,
            device=device,
        )
    stdout_console().print(validation_table(result))
    if not result.passed:
        for check in (c for c in result.checks if not c.passed):
            for failure in () if check.judged_by_text else check.parity.failures[:5]:
                click.echo(f"FAILED {check.artifact} on {check.engine}: {failure}", err=True)
            if check.first_bad_layer:
                click.echo(f"{check.artifact} first diverges at {check.first_bad_layer}", err=True)
            if check.text and not check.text.passed:
                click.echo(
                    f"FAILED {check.artifact} on {check.engine}: held-out bits per byte "
                    f"{check.text.bits_per_byte:.4f} is {check.text.change:+.2%} against eager's "
                    f"{check.text.reference:.4f} (budget {check.text.budget:+.2%})",
                    err=True,
                )
        raise SystemExit(1)


# `bench --quick`: what a first run needs to show the point in about a minute: the two
# artifact kinds people deploy (ONNX, TorchScript), each checked against eager, timed
# side by side with eager at a short and a long length; any flag given explicitly wins.
QUICK_BENCH = {
    "formats": "onnx,torchscript",
    "streaming": False,
    "check_length": 500,  # the long check length (7c + 52 at c = 64): not a chunk multiple
    "lengths": "256,2048",  # 4096 added ~11 s to the first run, mostly eager's repeats
    "engines": "eager,torchscript,ort-cpu-disabled,ort-cpu-all",
    "decode": "",
    "validation_lengths": "1,500",
    "budget": 0.5,
    "reduced_precision": False,  # the int8 sensitivity search alone takes minutes
}


@cli.command()
@click.argument("target")
@click.option(
    "--quick",
    is_flag=True,
    help="A first look (about a minute on 2 cores): "
    + "; ".join(f"{k.replace('_', '-')} {v!r}" for k, v in QUICK_BENCH.items()),
)
@click.option("--lengths", default="256,1024,4096", show_default=True, help="Comma-separated sequence lengths.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size.")
@click.option("--engines", default=None, help="Comma-separated engines [default: all available].")
@click.option(
    "--decode",
    "decode",
    default="256,1024,4096",
    show_default=True,
    help="Context lengths for streaming decode latency ('' to skip).",
)
@click.option("--validation-lengths", default=None, help="Lengths for the validation pass [default: validate's].")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(),
    default=None,
    help="Export directory when TARGET is a model [default: ./export/<model>].",
)
@click.option(
    "--formats",
    default=None,
    help="Formats to export when TARGET is a model [default: every one installed of "
    + ", ".join(f.name for f in FORMATS.values() if f.benched)
    + "].",
)
@click.option(
    "--streaming/--no-streaming",
    default=True,
    show_default=True,
    help="Export streaming graphs too when TARGET is a model (decode latency needs them).",
)
@click.option(
    "--check-length",
    type=click.IntRange(min=1),
    default=2048,
    show_default=True,
    help="Longest length each exported artifact is checked at.",
)
@TOLERANCE
@THREADS
@click.option(
    "--budget",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Most seconds of timing per engine and length (stops sooner once the spread is small).",
)
@click.option("--force", is_flag=True, help="Export over a non-empty --out directory (its files are replaced).")
@TRUST_CODE
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="cpu",
    show_default=True,
    help="Time the engines that compute there (cuda: eager, bf16 autocast, compile and TorchScript on the "
    "GPU, ONNX Runtime's CUDA provider), against eager on that device.",
)
@click.option(
    "--reduced-precision/--no-reduced-precision",
    default=True,
    show_default=True,
    help="Make the int8 graph and bf16 plans this CPU can run (byte-level LMs, judged by held-out bits "
    "per byte in windows of each --lengths) and weigh them in the recommendation.",
)
@EVAL_TEXT
@ACCURACY_BUDGET
@click.pass_context
def bench(ctx, target, quick, **options) -> None:
    """Export (if TARGET is a model), validate and benchmark every engine side by side.

    TARGET is an export directory, or a model as export takes it (a preset, a checkpoint
    or Hugging Face model directory, a module reference). Writes
    report.json, report.md and plots into the export directory and prints the table.
    """

    if quick:
        options.update({k: v for k, v in QUICK_BENCH.items() if ctx.get_parameter_source(k) is ParameterSource.DEFAULT})
    o = options
    bench_options = BenchOptions(
        lengths=tuple(_int_list(o["lengths"], "--lengths")),
        batch=o["batch"],
        engines=tuple(e.strip() for e in o["engines"].split(",")) if o["engines"] else None,
        decode_contexts=tuple(_int_list(o["decode"], "--decode")) if o["decode"] else (),
        validation_lengths=(
            tuple(_int_list(o["validation_lengths"], "--validation-lengths")) if o["validation_lengths"] else None
        ),
        tolerance=o["tolerance"],
        threads=o["threads"],
        budget_s=o["budget"],
        trust_code=o["trust_code"],
        eval_text=_eval_text(o["eval_text"], o["accuracy_budget"]),
        accuracy_budget=o["accuracy_budget"],
        reduced_precision=o["reduced_precision"],
        device=o["device"],
    )
    export = BenchExport(
        out_dir=o["out_dir"],
        formats=tuple(f.name for f in parse_formats(o["formats"])) if o["formats"] else None,
        streaming=o["streaming"],
        long_length=o["check_length"],
        overwrite=o["force"],
    )
    with progress_steps(Console(stderr=True)) as progress:
        run = benchmark(target, bench_options, export, progress)
    stdout_console().print(bench_table(run.bench, o["tolerance"], run.accuracy_budget))
    click.echo(f"reports: {', '.join(str(p) for p in run.reports)}")
    stdout_console().print(recommendation_text(run.recommendation))
    for engine in run.over_budget:
        click.echo(
            f"FAILED {engine}: held-out bits per byte rose more than the accuracy budget "
            f"({o['accuracy_budget']:+.0%}); see report.md",
            err=True,
        )
    if quick:
        click.echo(
            "quick run: drop --quick for every format, streaming decode, torch.compile, every ORT level and 3 lengths"
        )
    if not run.validation.passed or any(not e.ok for e in run.bench.engines) or run.over_budget:
        raise SystemExit(1)


@cli.command("import-upstream")
@click.argument("checkpoint", type=click.Path())
@click.option("--heads", type=int, required=True, help="num_heads the model was built with (shapes cannot tell).")
@click.option("--chunk-size", "chunk_size", type=int, required=True, help="chunk_size it was built with.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(),
    default=None,
    help="Checkpoint directory to write [default: CHECKPOINT without its suffix].",
)
@click.option(
    "--max-positions",
    "max_positions",
    type=int,
    default=None,
    help="Extend the package's 5000-row positional table to this many rows [default: keep 5000].",
)
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
def import_upstream(checkpoint, heads, chunk_size, out_dir, max_positions, force) -> None:
    """Import a state dict saved from the PyPI package bsbr 0.1.1 (`BSBRModel`).

    Reads CHECKPOINT (.safetensors, or .pt/.bin loaded with weights_only=True), infers
    vocab, hidden, layers, ff and compression from its shapes, checks every key, and
    writes a checkpoint directory (flavor bsbr-0.1.1) that `export`, `validate` and
    `bench` take. The model reproduces the package's numerics, so it is NOT causal and
    cannot stream.
    """

    model = load_upstream(checkpoint, heads, chunk_size, max_positions)
    out = save_model(model, Path(out_dir) if out_dir else Path(checkpoint).with_suffix(""), overwrite=force)
    cfg = model.config
    click.echo(
        f"imported {checkpoint} -> {out}: vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, layers "
        f"{cfg.num_layers}, heads {cfg.num_heads}, chunk {cfg.chunk_size}, ff {cfg.ff_size}, compression "
        f"{cfg.compression or '-'}, max length {model.pos_encoding.rows}"
    )
    click.echo(f"note: {NOT_CAUSAL}.")


@cli.command()
@click.argument("export_dir", type=click.Path())
@click.option(
    "--length",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Sequence length to time levels and measure int8 at.",
)
@precision_options
@click.option(
    "--target-top1",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=0.97,
    show_default=True,
    help="int8 of models without text: keep the most sensitive MatMuls in fp32 until top-1 agreement "
    "reaches this (byte-level LMs are held to --accuracy-budget instead).",
)
@click.option(
    "--eval-windows",
    default=",".join(map(str, DEFAULT_EVAL_WINDOWS)),
    show_default=True,
    help="Window lengths int8 and bf16 are judged at: held-out bits per byte must stay within "
    "--accuracy-budget in each (int8 loses most in short windows, bf16 at long positions).",
)
@THREADS
@TRUST_CODE
@EVAL_TEXT
@ACCURACY_BUDGET
def optimize(
    export_dir, length, target_top1, eval_windows, threads, trust_code, eval_text, accuracy_budget, **asked
) -> None:
    """Measure ONNX Runtime's optimization levels here and save the fastest that still
    matches eager (model.optimized.onnx); quantize to int8 keeping sensitive nodes fp32;
    convert to fp16 for the CUDA provider (model.fp16.onnx); plan bf16. Check the graphs
    with `validate`, time them with `bench`."""
    text = _eval_text(eval_text, accuracy_budget)
    with progress_steps(Console(stderr=True)) as progress:
        done = optimize_export(
            export_dir,
            length=length,
            target_top1=target_top1,
            threads=threads,
            eval_windows=tuple(_int_list(eval_windows, "--eval-windows")),
            eval_text=text,
            accuracy_budget=accuracy_budget,
            trust_code=trust_code,
            progress=progress,
            **asked,
        )
    console = stdout_console()
    console.print(levels_table(done.level))
    if done.fp16_path is not None:
        click.echo(f"fp16: wrote {done.fp16_path.name} for the CUDA provider; `bsbr-export validate` checks it")
    elif asked["fp16"] is None:
        click.echo("fp16: skipped, ONNX Runtime's CUDA provider is not available here (--fp16 forces it)")
    failed = False
    for quant in done.int8:
        console.print(quant_table(quant))
        if not quant.reached:
            failed = True
            if quant.fp32_bits_per_byte is not None:
                click.echo(
                    f"FAILED {quant.path.name}: no int8 graph stays within the accuracy budget "
                    f"({accuracy_budget:+.0%} held-out bits per byte)",
                    err=True,
                )
            else:
                click.echo(
                    f"int8 never reached top-1 {target_top1} (best {max(s.top1 for s in quant.steps):.3f})", err=True
                )
    for plan in done.bf16:
        console.print(bf16_table(plan))
        if not plan.passed:
            failed = True
            click.echo(
                f"FAILED {plan.engine}: held-out bits per byte {plan.change:+.2%} vs fp32 in its worst "
                f"window even with {', '.join(plan.keep_fp32) or 'nothing'} in fp32",
                err=True,
            )
    if failed:
        raise SystemExit(1)


@cli.command()
@click.argument("model")
@TRUST_CODE
def doctor(model: str, trust_code: bool) -> None:
    """Check that MODEL exports with a dynamic batch and sequence.

    MODEL is path/to/file.py:factory or package.module:factory (a callable that returns
    an nn.Module), a Hugging Face model directory, a checkpoint directory or a preset.
    Its example input is input_ids (vocab of the first
    nn.Embedding) or [2, L, hidden] floats (the first nn.Linear's width), L = 3c + 1.
    Prints each line that ties the graph to the example's shape, with what to change;
    exit 1 when there is one.
    """

    report = diagnose(load_module(model, trust_code=trust_code))
    click.echo(report.to_text())
    if not report:
        raise SystemExit(1)


@cli.command()
@click.argument("repo", type=click.Path())
@port_option("--http-port", 8000, "HTTP port on 127.0.0.1")
@port_option("--grpc-port", 8001, "gRPC port on 127.0.0.1")
@click.option(
    "--triton-env",
    type=click.Path(),
    envvar="BSBR_TRITON_ENV",
    default=None,
    help="The venv holding nvidia-pytriton, numpy<2 and onnxruntime [default: $BSBR_TRITON_ENV].",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=60,
    show_default=True,
    help="Seconds to wait for the server to be ready.",
)
def serve(repo, http_port, grpc_port, triton_env, timeout) -> None:
    """Serve REPO (a --triton-repo directory) with a real tritonserver on 127.0.0.1.

    Loads the models this server's backends can run (the Python-backend ones: the
    nvidia-pytriton wheel has no ONNX Runtime backend), names those it skipped, prints
    the endpoints and serves until Ctrl-C, which stops the server.
    """

    def ready(server) -> None:
        click.echo(
            f"tritonserver ready in {server.start_seconds:.1f} s (pid {server.pid}): "
            f"HTTP {server.http_url}, gRPC {server.grpc_url}"
        )
        click.echo(f"models: {', '.join(server.models.loaded)}")
        for model, backend in server.models.skipped.items():
            click.echo(f"skipped {model}: needs the {backend} backend, which this server lacks")
        click.echo("Ctrl-C stops it")

    run_server(repo, triton_env, http_port=http_port, grpc_port=grpc_port, timeout_s=timeout, on_ready=ready)


@cli.command("serve-openai")
@click.argument("export_dir", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (only 127.0.0.1 is tested).")
@port_option("--port", 8000, "Port")
@click.option("--model-name", default=None, help="The model's name in the API [default: the export's model name].")
@click.option(
    "--token-budget",
    type=click.IntRange(min=1),
    default=DEFAULT_TOKEN_BUDGET,
    show_default=True,
    help="Tokens per iteration while generations run: one each, joining prompts share the rest.",
)
@click.option(
    "--max-sequences",
    type=click.IntRange(min=1),
    default=MAX_SEQUENCES,
    show_default=True,
    help="Generations held at once; past it a request gets 429.",
)
@click.option(
    "--max-prompt-tokens",
    type=click.IntRange(min=1),
    default=MAX_PROMPT_TOKENS,
    show_default=True,
    help="Longest prompt taken.",
)
@THREADS
def serve_openai(export_dir, host, port, model_name, token_budget, max_sequences, max_prompt_tokens, threads) -> None:
    """Serve EXPORT_DIR with an OpenAI-compatible API until Ctrl-C.

    /v1/completions, /v1/chat/completions (where the export carries a chat template),
    /v1/models; streamed as server-sent events with "stream": true. EXPORT_DIR is an
    ONNX export with --streaming of a model with a row step (the native presets, a
    model on bsbr_export.nn); generations are batched in flight.
    """
    limits = Limits(max_sequences=max_sequences, max_prompt_tokens=max_prompt_tokens)
    app = create_app(export_dir, model_name, threads=threads, token_budget=token_budget, limits=limits)
    serve_openai_app(app, host, check_port(port, "--port"))


@cli.command("serve-web")
@click.argument("export_dir", type=click.Path())
@port_option("--port", 8080, "Port on 127.0.0.1")
@click.option(
    "--no-isolation", is_flag=True, help="Leave out the cross-origin isolation headers (wasm then runs on one thread)."
)
def serve_web(export_dir, port, no_isolation) -> None:
    """Serve EXPORT_DIR's web page (--format web) on 127.0.0.1 until Ctrl-C."""
    server = page_server(export_dir, port, isolated=not no_isolation)
    host, bound = server.server_address[:2]
    click.echo(
        f"serving {web_dir(export_dir)} at http://{host}:{bound}/ "
        f"({'not ' if no_isolation else ''}cross-origin isolated); Ctrl-C stops it",
        err=False,
    )
    with server:
        server.serve_forever()


def _int_list(text: str, flag: str) -> list[int]:

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"{flag} must be integers >= 1, got {text!r}")
    return values


def _parse_static(text: str) -> tuple[int, int]:

    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"--static must look like 2x128 (BATCHxLENGTH, both >= 1), got {text!r}")
    return int(parts[0]), int(parts[1])


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: one error boundary for every command."""
    try:
        cli.main(args=argv, prog_name="bsbr-export", standalone_mode=False)
    except UserError as exc:
        click.echo(f"bsbr-export: error: {exc}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("bsbr-export: interrupted", err=True)
        return 130
    except click.ClickException as exc:
        click.echo(f"bsbr-export: error: {exc.format_message()}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("bsbr-export: interrupted", err=True)
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
