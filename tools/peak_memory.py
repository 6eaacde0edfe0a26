"""Peak RSS of one eager forward of a preset at several lengths, each in a fresh process.

    python tools/peak_memory.py [--model bsbr-small] [--lengths 1024,4096,16384] [--out tools/results] [--smoke]

Writes peak_memory_<model>.{json,md} to --out. Linear memory in L means the forward's
own memory (peak minus the RSS before it) grows ~4x per 4x length; an L x L score matrix
would make it grow ~16x.
`--smoke`: bsbr-tiny at lengths 64 and 256.
"""

from __future__ import annotations

import lab

THREADS = 2


def forward_peak(model_name: str, length: int) -> dict:
    """One eager forward of preset `model_name` at `length` in this process: the RSS
    before it and the process's peak after it, in MiB."""
    import torch

    from bsbr_export import load_model
    from bsbr_export.proof.bench import peak_rss_mib

    torch.set_num_threads(THREADS)
    model = load_model(model_name)
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    base = peak_rss_mib()
    with torch.inference_mode():
        model(ids)
    return {"length": length, "rss_before_mib": base, "peak_rss_mib": peak_rss_mib()}


def measure(model_name: str, length: int) -> dict:
    """`forward_peak` in a fresh process (its peak is this length's alone), with the
    forward's own memory."""
    row = lab.in_child(forward_peak, model_name, length)
    return {**row, "forward_extra_mib": row["peak_rss_mib"] - row["rss_before_mib"]}


def report(result: dict) -> str:
    """The peak per length and how it grows from one length to the next."""
    rows = result["rows"]
    machine = result["machine"]
    lines = [
        *lab.heading(
            f"Peak memory of one eager forward: {result['model']}, batch 1, {result['threads']} threads", machine
        ),
        "Each length in a fresh process.",
        "",
        "| length | RSS before MiB | peak RSS MiB | forward adds MiB |",
        "|---|---|---|---|",
        *(
            f"| {r['length']} | {r['rss_before_mib']:.1f} | {r['peak_rss_mib']:.1f} | {r['forward_extra_mib']:.1f} |"
            for r in rows
        ),
        "",
        "| lengths | peak RSS | forward's own memory |",
        "|---|---|---|",
    ]
    for a, b in zip(rows, rows[1:]):
        extra = b["forward_extra_mib"] / max(a["forward_extra_mib"], 1e-9)
        lines.append(
            f"| {a['length']} -> {b['length']} | x{b['peak_rss_mib'] / a['peak_rss_mib']:.2f} | x{extra:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = lab.parser(__doc__, model="bsbr-small")
    parser.add_argument("--lengths", default="1024,4096,16384")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.lengths = "bsbr-tiny", "64,256"
    result = {
        "model": args.model,
        "batch": 1,
        "threads": THREADS,
        "machine": lab.machine(threads=THREADS),
        "rows": [lab.progress(f"L={n}", measure, args.model, int(n)) for n in args.lengths.split(",")],
    }
    lab.write(args.out, f"peak_memory_{args.model}", result, report)


if __name__ == "__main__":
    main()
