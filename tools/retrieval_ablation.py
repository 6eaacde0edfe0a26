"""Does block retrieval pay? The same model, data, seed and budget, four ways of joining
the retrieved state to the local term:

    python tools/retrieval_ablation.py --steps 1500 --batch 2 --length 2048 --jobs 2
    python tools/retrieval_ablation.py --score-only RUNS      # score runs made earlier

Arms: `none` (within-chunk attention only), `sum` (the brief's `local + q S`), `gated`
(`(1 - g) local + g RMSNorm(q S)`) and `linear` (`q S` normalized as linear attention,
an arm of this study only). Each is trained by tools/train.py in its own process from
the same initial weights on the same batches; each is then scored on the same held-out
bytes in windows of 512, 4096 and 16384, and on each chunk alone (windows of one chunk:
nothing to retrieve). "Gain from retrieval" is the chunk-alone bits per byte minus the
4096-window bits per byte over exactly the bytes both score. Writes
retrieval_ablation.{json,md} to --out. Nothing here is asserted.
`--smoke`: every arm for 2 steps of 1 x 128 bytes, scored on 4 KiB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lab
import numpy as np
import torch
from safetensors.torch import load_file
from train import FORMS, HELDOUT_BYTES, RECORD, WEIGHTS, build_model, learned_mix, logits_fn, retrieval_gain

from bsbr_export.proof.evaltext import byte_bits, heldout_text

HERE = Path(__file__).resolve().parent
WINDOWS = (512, 4096, 16384)


def main() -> None:
    parser = lab.parser(__doc__)
    parser.add_argument("--arms", default=",".join(FORMS), help=f"comma-separated, of {', '.join(FORMS)}")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--jobs", type=int, default=2, help="arms trained at once, one thread each")
    parser.add_argument("--heldout-bytes", type=int, default=HELDOUT_BYTES)
    parser.add_argument(
        "--runs", type=Path, default=None, help="the arms' runs (default /tmp/retrieval_ablation, -smoke with --smoke)"
    )
    parser.add_argument("--score-only", action="store_true", help="score the runs already in --runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.batch, args.length, args.heldout_bytes = 2, 1, 128, 4096
    # A smoke run's arms never replace a real run's.
    args.runs = args.runs or Path(tempfile.gettempdir()) / f"retrieval_ablation{'-smoke' if args.smoke else ''}"
    arms = args.arms.split(",")
    if not args.score_only:
        train_arms(arms, args)
    torch.set_num_threads(args.jobs)
    results = {arm: score(args.runs / arm, args.heldout_bytes) for arm in arms}
    record = {
        "arms": results,
        "steps": args.steps,
        "batch": args.batch,
        "length": args.length,
        "lr": args.lr,
        "jobs": args.jobs,
        "heldout_bytes": args.heldout_bytes,
        "machine": lab.machine(threads=1),
    }
    lab.write(args.out, "retrieval_ablation", record, report)


def train_arms(arms: list[str], args: argparse.Namespace) -> None:
    """tools/train.py for each arm, `--jobs` at a time, each on one thread. Popen rather than
    `lab.in_child`: each arm is a real train.py command (its record's command runs it again
    alone) and hours long, so its output goes to a log followed while it runs."""
    pending, running = list(arms), []
    while pending or running:
        while pending and len(running) < args.jobs:
            arm = pending.pop(0)
            command = [
                sys.executable,
                str(HERE / "train.py"),
                "--retrieval",
                arm,
                "--steps",
                str(args.steps),
                "--batch",
                str(args.batch),
                "--length",
                str(args.length),
                "--lr",
                str(args.lr),
                "--bf16",
                "--threads",
                "1",
                "--eval-every",
                "250",
                "--run",
                str(args.runs / arm),
                "--no-finish",
            ]
            (args.runs / arm).mkdir(parents=True, exist_ok=True)
            log = (args.runs / arm / "train.log").open("w")
            running.append((arm, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(5)
        for arm, process in list(running):
            if process.poll() is not None:
                running.remove((arm, process))
                if process.returncode:
                    raise SystemExit(f"training arm {arm} failed: see {args.runs / arm / 'train.log'}")


def score(run: Path, heldout_bytes: int) -> dict:
    """One arm's held-out bits per byte by window, the chunk-alone figure and its record."""
    record = json.loads((run / RECORD).read_text())
    model = build_model(record["retrieval"])
    model.load_state_dict({k: v.float() for k, v in load_file(run / WEIGHTS).items()})
    model.eval()
    logits_of = logits_fn(model, torch.device("cpu"))
    text = heldout_text(heldout_bytes)
    bits = {w: byte_bits(logits_of, text, w) for w in WINDOWS}
    result = {
        "bpb": {str(w): round(float(np.nanmean(bits[w])), 4) for w in WINDOWS},
        **retrieval_gain(logits_of, text, model.config.chunk_size, bits[4096]),
        "steps": record["steps"],
        "bytes_seen": record["tokens_seen"],
        "train_seconds": record["seconds"],
        "curve": record["curve"],
    }
    if record["retrieval"] == "gated":
        result["learned"] = learned_mix(model)
    print(run.name, json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
    return result


def verdict(results: dict) -> str:
    """The question the study answers, answered from its own figures."""
    if "none" not in results:
        return ""
    none = results["none"]["bpb"]
    best = min((arm for arm in results if arm != "none"), key=lambda arm: results[arm]["bpb"]["4096"])
    lines = [
        f"Does block retrieval beat no retrieval? The best retrieving arm at 4096, `{best}`, against `none`: "
        + "; ".join(
            f"{w}-byte windows {results[best]['bpb'][w]} vs {none[w]} ({results[best]['bpb'][w] - none[w]:+.4f})"
            for w in ("4096", "16384")
        )
        + ("." if any(results[best]["bpb"][w] < none[w] for w in ("4096", "16384")) else ": no, at this budget.")
    ]
    return "\n".join(lines) + "\n"


def report(record: dict) -> str:
    """The study's record as markdown: each arm's scores, the verdict, what `gated` learned."""
    results, machine = record["arms"], record["machine"]
    first = next(iter(results.values()))
    rows = "\n".join(
        f"| `{arm}` | {' | '.join(str(r['bpb'][str(w)]) for w in WINDOWS)} | {r['chunk_alone_bpb']} | "
        f"{r['gain_from_retrieval']:+.4f} | {r['train_seconds'] / 60:.0f} |"
        for arm, r in results.items()
    )
    learned = "".join(
        f"\n| {row['layer']} | {', '.join(map(str, row['gate']))} | {', '.join(map(str, row['norm_scale_mean']))} |"
        for row in results.get("gated", {}).get("learned", [])
    )
    return (
        "# Retrieval ablation\n\n"
        f"`bsbr-stdlib`'s shape (4 layers, hidden 256, 4 heads, chunk 64), seed 0, the same initial weights and "
        f"batches for every arm: {record['steps']} steps of {record['batch']} x {record['length']} bytes "
        f"({first['bytes_seen'] / 1e6:.1f} M bytes seen), lr {record['lr']}, bf16 autocast, one thread per arm, "
        f"{record['jobs']} at a time. {lab.describe(machine)} Scored on the "
        f"first {record['heldout_bytes']} held-out bytes of Python {machine['versions']['python']}'s stdlib, fp16 "
        f"weights run in fp32.\n\n"
        "| arm | bpb, windows of 512 | 4096 | 16384 | each chunk alone | gain from retrieval | train minutes |\n"
        "|---|---|---|---|---|---|---|\n" + rows + "\n\n"
        "Gain from retrieval: chunk-alone minus 4096-window bits per byte on the same bytes (positive: what a "
        "token reads from earlier chunks helps). `none` reads nothing from earlier chunks: its figure is what "
        "moving every chunk to positions 0..63 costs, the baseline the others' gains stand on.\n\n"
        + verdict(results)
        + (
            "\n## What the gated arm learned\n\n| layer | gate g_h per head | norm scale (mean) per head |\n"
            "|---|---|---|" + learned + "\n"
            if learned
            else ""
        )
    )


if __name__ == "__main__":
    main()
