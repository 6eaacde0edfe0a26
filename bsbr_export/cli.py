"""`bsbr-export`: a thin command line over the library.

Each command parses its flags, makes one library call and renders the result.
Exit status: 0 ok, 1 a check failed, 2 a user error (one line on stderr), 130 Ctrl-C.
"""

from __future__ import annotations

import sys

import click

from bsbr_export.errors import UserError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bsbr-export")
def cli() -> None:
    """Export BSBR attention models to ONNX and TorchScript, and prove them right and fast."""


@cli.command()
@click.argument("name", required=False)
def models(name: str | None) -> None:
    """List the model zoo's presets, or show the preset NAME."""
    from rich.console import Console
    from rich.table import Table

    from bsbr_export.zoo import get_preset, list_presets

    presets = [get_preset(name)] if name else list(list_presets().values())
    table = Table(title="bsbr-export model zoo" if not name else None)
    for column in ("name", "params", "hidden", "layers", "heads", "chunk", "compression"):
        table.add_column(column, justify="left" if column == "name" else "right", no_wrap=True)
    for preset in presets:
        cfg = preset.config
        table.add_row(
            preset.name,
            _human(_param_count(cfg)),
            str(cfg.hidden_size),
            str(cfg.num_layers),
            str(cfg.num_heads),
            str(cfg.chunk_size),
            str(cfg.compression or "-"),
        )
    console = Console()
    console.print(table)
    if name:
        console.print(presets[0].description)


@cli.command()
@click.argument("model")
@click.option("--length", default=None, type=click.IntRange(min=1), help="Tokens per sequence [default: 4c+3].")
@click.option("--batch", default=2, show_default=True, type=click.IntRange(min=1), help="Sequences per batch.")
def run(model: str, length: int | None, batch: int) -> None:
    """Build MODEL (preset name or checkpoint directory), run it, and print a summary.

    Runs one full forward and the same tokens streamed in uneven pieces, and reports
    how far apart they are (they must agree: streaming equals parallel).
    """
    from rich.console import Console

    from bsbr_export.summary import summarize

    summary = summarize(model, length=length, batch=batch)
    Console().print(summary.to_table())
    if not summary.passed:
        raise SystemExit(1)


@cli.command()
@click.argument("model")
@click.option("--out", "out_dir", type=click.Path(), default=None, help="Export directory [default: ./export/<model>].")
@click.option("--format", "formats", default="onnx,torchscript", show_default=True,
              help="Comma-separated formats: " + ", ".join(("onnx", "torchscript")) + ".")
@click.option("--streaming", is_flag=True, help="Also export streaming-step graphs (past.* -> present.*).")
@click.option("--static", "static", default=None, metavar="BATCHxLENGTH", help="Fixed-shape ONNX graph instead of dynamic axes.")
@click.option("--opset", type=int, default=None, help="ONNX opset [default: the exporter's].")
@click.option("--tolerance", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Max abs error allowed, relative to the logit scale (max |logit|, at least 1).")
@click.option("--force", is_flag=True, help="Replace a non-empty export directory.")
def export(model, out_dir, formats, streaming, static, opset, tolerance, force) -> None:
    """Export MODEL (preset name or checkpoint directory) and check every artifact.

    Each artifact is compared with the eager model at lengths 1, c-1, c, c+1, 3c+5 and
    2048 (batches 1 and 3, plus a right-padded masked batch); any failure exits 1.
    """
    from pathlib import Path

    from rich.console import Console

    from bsbr_export.formats import parse_formats
    from bsbr_export.pipeline import export_model
    from bsbr_export.render import export_table

    console = Console(stderr=True)
    chosen = parse_formats(formats)
    static_shape = _parse_static(static) if static else None
    out = Path(out_dir) if out_dir else Path("export") / Path(model).name
    with console.status("exporting") as status:
        result = export_model(
            model, out, chosen, streaming=streaming, static_shape=static_shape, opset=opset,
            overwrite=force, tolerance=tolerance, progress=lambda step: status.update(step),
        )
    Console().print(export_table(result))
    if not result.passed:
        for artifact in result.artifacts:
            for failure in artifact.parity.failures[:5]:
                click.echo(f"FAILED {artifact.name}: {failure}", err=True)
        raise SystemExit(1)


@cli.command()
@click.argument("export_dir", type=click.Path())
@click.option("--tolerance", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Max abs error allowed, relative to the logit scale (max |logit|, at least 1).")
@click.option("--lengths", default=None, help="Comma-separated lengths [default: 1,c-1,c,c+1,3c+5,2048].")
@click.option("--batches", default="1,2,3", show_default=True, help="Comma-separated batch sizes.")
@click.option("--provider", "providers", multiple=True, help="ONNX Runtime provider(s) [default: all available].")
def validate(export_dir, tolerance, lengths, batches, providers) -> None:
    """Check every artifact in EXPORT_DIR against the eager model it came from.

    Writes EXPORT_DIR/validation.json. Exits 1 when any case fails, naming the case and,
    for ONNX graphs, the first block whose output diverges.
    """
    import json
    from pathlib import Path

    from rich.console import Console

    from bsbr_export.io import atomic_write
    from bsbr_export.render import validation_table
    from bsbr_export.validate import validate_export

    with Console(stderr=True).status("validating"):
        result = validate_export(
            export_dir, tolerance=tolerance, lengths=_int_list(lengths, "--lengths") if lengths else None,
            batches=tuple(_int_list(batches, "--batches")), providers=list(providers) or None,
        )
    with atomic_write(Path(export_dir) / "validation.json") as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    Console().print(validation_table(result))
    if not result.passed:
        for check in result.checks:
            for failure in check.parity.failures[:5]:
                click.echo(f"FAILED {check.artifact} on {check.engine}: {failure}", err=True)
            if check.first_bad_layer:
                click.echo(f"{check.artifact} first diverges at {check.first_bad_layer}", err=True)
        raise SystemExit(1)


def _int_list(text: str, flag: str) -> list[int]:
    from bsbr_export.errors import UserError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UserError(f"{flag} must be integers >= 1, got {text!r}")
    return values


def _parse_static(text: str) -> tuple[int, int]:
    from bsbr_export.errors import UserError

    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"--static must look like 2x128 (BATCHxLENGTH, both >= 1), got {text!r}")
    return int(parts[0]), int(parts[1])


def _param_count(cfg) -> int:
    import torch

    from bsbr_export.model import BSBRModel

    with torch.device("meta"):  # shapes only: counting bsbr-base allocates nothing
        return sum(p.numel() for p in BSBRModel(cfg).parameters())


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
