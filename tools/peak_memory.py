"""Peak RSS of one eager forward of a preset at several lengths, each in a fresh process.

    python tools/peak_memory.py --model bsbr-small --lengths 1024,4096,16384

Writes tools/results/peak_memory_<model>.json and prints the table. Linear memory in L
means the forward's own memory (peak minus the RSS before it) grows ~4x per 4x length;
an L x L score matrix would make it grow ~16x.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _child(model_name: str, length: int) -> None:
    import torch

    from bsbr_export import load_model
    from bsbr_export.proof.bench import peak_rss_mib

    torch.set_num_threads(2)
    model = load_model(model_name)
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    base = peak_rss_mib()
    with torch.inference_mode():
        model(ids)
    print(json.dumps({"length": length, "rss_before_mib": base, "peak_rss_mib": peak_rss_mib()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="bsbr-small")
    parser.add_argument("--lengths", default="1024,4096,16384")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.model, args.child)
        return
    import torch

    rows = []
    for length in map(int, args.lengths.split(",")):
        out = subprocess.run(
            [sys.executable, __file__, "--model", args.model, "--child", str(length)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        row = json.loads(out.strip().splitlines()[-1])
        row["forward_extra_mib"] = row["peak_rss_mib"] - row["rss_before_mib"]
        rows.append(row)
        print(
            f"L={length:6d}  peak RSS {row['peak_rss_mib']:8.1f} MiB  forward adds {row['forward_extra_mib']:8.1f} MiB"
        )
    for a, b in zip(rows, rows[1:]):
        ratio = b["peak_rss_mib"] / a["peak_rss_mib"]
        extra = b["forward_extra_mib"] / max(a["forward_extra_mib"], 1e-9)
        print(f"L {a['length']} -> {b['length']}: peak RSS x{ratio:.2f}, forward's own memory x{extra:.2f}")
    RESULTS.mkdir(exist_ok=True)
    out_path = RESULTS / f"peak_memory_{args.model}.json"
    out_path.write_text(
        json.dumps(
            {
                "model": args.model,
                "batch": 1,
                "threads": 2,
                "machine": platform.machine(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
