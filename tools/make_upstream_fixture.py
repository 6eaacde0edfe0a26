"""Write tests/fixtures/upstream/: a tiny bsbr 0.1.1 checkpoint and the package's outputs.

Runs the real PyPI package (`pip install --no-deps --ignore-requires-python bsbr==0.1.1`),
so that tests/model/test_upstream.py still checks parity where the package is not installed:

- `model.safetensors`: `bsbr.BSBRModel(...).state_dict()` as-is (random weights, every
  bias and LayerNorm parameter made nonzero so each one matters);
- `expected.safetensors`: `ids.{L}` [2, L] int64 and `hidden.{L}` [2, L, hidden], the
  package's eval-mode outputs, at lengths around the chunk size;
- `fixture.json` (and `fixture.md`, the same for a reader): the constructor arguments,
  lengths and versions.

    python tools/make_upstream_fixture.py [--out tests/fixtures/upstream] [--smoke]

`--smoke`: the same fixture (it is tiny already), which its test compares with the committed one.
"""

from __future__ import annotations

from pathlib import Path

import lab
import torch
from safetensors.torch import save_file

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "upstream"
# Small on purpose: the committed files stay ~170 KB (mostly the 5000-row `pos_encoding.pe`).
ARGS = dict(
    vocab_size=40, hidden_dim=8, num_layers=2, num_heads=2, chunk_size=4, ff_dim=16, dropout=0.1, compression_factor=2
)
LENGTHS = [1, 2, 3, 4, 5, 8, 11, 17, 37]
SEED = 5


def main() -> None:
    out = lab.parser(__doc__, out=FIXTURE).parse_args().out

    from importlib.metadata import version

    import bsbr

    torch.manual_seed(SEED)
    model = bsbr.BSBRModel(**ARGS).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:  # biases and LayerNorm affine: nonzero, so each one counts
                param.normal_(0.0, 0.5)
    generator = torch.Generator().manual_seed(SEED)
    expected = {}
    with torch.no_grad():
        for length in LENGTHS:
            ids = torch.randint(0, ARGS["vocab_size"], (2, length), generator=generator)
            expected[f"ids.{length}"] = ids
            expected[f"hidden.{length}"] = model(ids)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    save_file(expected, out / "expected.safetensors")
    info = {
        "bsbr": version("bsbr"),
        "torch": torch.__version__,
        "constructor": ARGS,
        "lengths": LENGTHS,
        "seed": SEED,
        "import": ["--heads", str(ARGS["num_heads"]), "--chunk-size", str(ARGS["chunk_size"])],
    }
    lab.write(out, "fixture", info, report)


def report(info: dict) -> str:
    """What the fixture holds and how it was made, for a reader of the folder."""
    lines = [
        f"# bsbr {info['bsbr']} fixture (torch {info['torch']})",
        "",
        "Written by `python tools/make_upstream_fixture.py`; tests/model/test_upstream.py imports "
        f"`model.safetensors` with `bsbr-export import-upstream {' '.join(info['import'])}` and compares "
        "its outputs with `expected.safetensors`.",
        "",
        "| constructor argument | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in info["constructor"].items()),
        "",
        f"Lengths: {', '.join(map(str, info['lengths']))} (batch 2); seed {info['seed']}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
