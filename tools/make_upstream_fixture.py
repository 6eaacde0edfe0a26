"""Write tests/fixtures/upstream/: a tiny bsbr 0.1.1 checkpoint and the package's outputs.

Runs the real PyPI package (`pip install --no-deps --ignore-requires-python bsbr==0.1.1`),
so that tests/test_upstream.py still checks parity where the package is not installed:

- `model.safetensors`: `bsbr.BSBRModel(...).state_dict()` as-is (random weights, every
  bias and LayerNorm parameter made nonzero so each one matters);
- `expected.safetensors`: `ids.{L}` [2, L] int64 and `hidden.{L}` [2, L, hidden], the
  package's eval-mode outputs, at lengths around the chunk size;
- `fixture.json`: the constructor arguments, lengths and versions.

    python tools/make_upstream_fixture.py [--out tests/fixtures/upstream]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# Small on purpose: the committed files stay ~170 KB (mostly the 5000-row `pos_encoding.pe`).
ARGS = dict(
    vocab_size=40, hidden_dim=8, num_layers=2, num_heads=2, chunk_size=4, ff_dim=16, dropout=0.1, compression_factor=2
)
LENGTHS = [1, 2, 3, 4, 5, 8, 11, 17, 37]
SEED = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/upstream")
    out = parser.parse_args().out

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
    (out / "fixture.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
    main()
