"""Train the `bsbr-stdlib` preset: a byte-level BSBR LM on CPython's standard library.

    python tools/train.py --device cuda --minutes 8 --run RUN --no-finish
                                                         # train on a GPU, checkpointing into RUN
    python tools/train.py --resume RUN --length 16384 --run RUN2
                                                         # a further phase from RUN's weights
    python tools/train.py --finish RUN                   # score RUN's weights on this machine, ship them

The data split is `bsbr_export.proof.evaltext.stdlib_split` of the interpreter running the
training (held-out files are never read for training; the curve scores its held-out slice).
A run writes its fp16 weights and record into `--run` every `--checkpoint-every` seconds, so
a run cut off still yields weights. `--finish` scores them on *this* machine's held-out files
at several window lengths and writes the preset TOML into models/, the loss curve and the
scores (train_bsbr-stdlib.{json,md,png}) to --out (tools/results by default).
`--smoke`: 4 steps of 2 x 256 bytes, scored on 4 KiB; run, preset and results all written
into --out (/tmp/train-smoke by default), nothing into models/ or tools/results.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import lzma
import math
import os
import tempfile
import time
import zlib
from contextlib import nullcontext
from pathlib import Path

import lab
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from bsbr_export.model.attention import packed_retrieval_weights, unpack_chunks
from bsbr_export.model.config import BSBRConfig
from bsbr_export.model.native import BSBRModel, NativeAttention
from bsbr_export.proof.evaltext import (
    BYTE_VOCAB,
    DEFAULT_EVAL_BYTES,
    EVAL_WINDOW,
    bits_per_byte,
    byte_bits,
    heldout_text,
    read_corpus,
    stdlib_split,
)

ROOT = Path(__file__).resolve().parents[1]
NAME = "bsbr-stdlib"
CONFIG = BSBRConfig(
    vocab_size=BYTE_VOCAB, hidden_size=256, num_layers=4, num_heads=4, chunk_size=64, ff_size=1024, retrieval="gated"
)
HELDOUT_BYTES = 256 * 1024  # the final held-out score (the presets' recorded slice is the first DEFAULT_EVAL_BYTES)
SCORED_WINDOWS = (EVAL_WINDOW, 4096, 16384)  # --finish scores the held-out bytes in windows of each
WEIGHTS, RECORD = "weights.safetensors", "train.json"  # what a run writes into --run


class LocalOnly(NativeAttention):
    """Ablation arm `none`: within-chunk attention only, no block retrieval (training and
    eager scoring only; not a BSBR model)."""

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._packed(t) for t in self._qkv(x, 0))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return unpack_chunks(self.out_proj(o.transpose(1, 2).flatten(-2)), x.shape[0])


class LinearRetrieval(NativeAttention):
    """Ablation arm `linear`: the retrieved term normalized as linear attention,
    `local_t + phi(q_t) S'_i / (phi(q_t) . z_i)`, `phi = elu + 1`, `S'_i = sum_j a_ij
    phi(K_j)^T V_j`, `z_i = sum_j a_ij sum_s phi(k_s)` with BSBR's chunk weights `a_ij`.
    It needs one more state vector per chunk (`z`), so it is trained and scored here only."""

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._packed(t) for t in self._qkv(x, 0))  # [B*n, H, c, e]
        e = q.shape[-1]
        local = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        weights = packed_retrieval_weights(*self._packed_meta(x), x.shape[1] // self.chunk_size)  # [H, B*n, B*n]
        fq, fk = F.elu(q) + 1, F.elu(k) + 1
        states = (weights @ (fk.transpose(-1, -2) @ v).flatten(-2).transpose(0, 1)).transpose(0, 1)
        sums = (weights @ fk.sum(-2).transpose(0, 1)).transpose(0, 1)  # [B*n, H, e]
        read = fq @ states.unflatten(-1, (e, e))
        norm = (fq * sums[:, :, None, :]).sum(-1, keepdim=True)  # 0 in a first chunk, where read is 0 too
        o = local + read / norm.clamp(min=1e-6)
        return unpack_chunks(self.out_proj(o.transpose(1, 2).flatten(-2)), x.shape[0])


ARMS = {"none": LocalOnly, "linear": LinearRetrieval}  # ablation arms beyond the package's forms
FORMS = ("sum", "gated", *ARMS)


def build_model(form: str) -> BSBRModel:
    """The preset's model with retrieval `form`: one of the package's forms, or an
    ablation arm swapped into every block."""
    model = BSBRModel(dataclasses.replace(CONFIG, retrieval=form if form not in ARMS else "sum"))
    for block in model.blocks if form in ARMS else ():
        arm = ARMS[form](model.config)
        arm.load_state_dict(block.attn.state_dict())  # every arm starts from the same weights
        block.attn = arm
    return model


def retrieval_gain(logits_of, text: bytes, chunk: int, windowed: np.ndarray) -> dict[str, float]:
    """Bits per byte with each chunk read alone (windows of one chunk: nothing to retrieve),
    and the gain from retrieval: that minus `windowed` (`byte_bits` of `text` in 4096-byte
    windows, computed once by the caller) over exactly the bytes both score (the first byte
    of each chunk is scored by neither)."""
    alone = byte_bits(logits_of, text, chunk)
    both = ~np.isnan(alone) & ~np.isnan(windowed)
    return {
        "chunk_alone_bpb": round(float(np.nanmean(alone)), 4),
        "gain_from_retrieval": round(float(alone[both].mean() - windowed[both].mean()), 4),
    }


def learned_mix(model: BSBRModel) -> list[dict]:
    """What retrieval form `gated` learned, per layer: each head's gate g_h = sigmoid(beta_h)
    (the share of the retrieved term) and the mean of its norm scale."""
    return [
        {
            "layer": i,
            "gate": [round(g, 3) for g in torch.sigmoid(block.attn.retrieval_gate).tolist()],
            "norm_scale_mean": [round(s, 3) for s in block.attn.retrieval_norm.mean(-1).tolist()],
        }
        for i, block in enumerate(model.blocks)
    ]


def logits_fn(model, device: torch.device):
    def logits_of(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(ids).to(device)).float().cpu().numpy()

    return logits_of


def learning_rate(progress: float, step: int, peak: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to a tenth of the peak as
    `progress` (the fraction of the run's steps or time spent) goes from 0 to 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def window_start(max_position: int, length: int, generator: torch.Generator, from_zero: float) -> int:
    """Where a training window's first byte sits: 0 with probability `from_zero` (as at
    inference), else a chunk-aligned position drawn so the window ends below
    `max_position`. Absolute sinusoid positions past the windows were never seen
    otherwise: the first preset, trained on 512-byte windows from 0, scored 14.5 bits
    per byte at L = 4096."""
    chunks = max((max_position - length) // CONFIG.chunk_size, 0)
    if chunks == 0 or torch.rand((), generator=generator).item() < from_zero:
        return 0
    return int(torch.randint(0, chunks + 1, (), generator=generator)) * CONFIG.chunk_size


def parse_args() -> argparse.Namespace:
    """The command line, with --smoke's sizes and folders filled in."""
    parser = lab.parser(__doc__)
    parser.add_argument("--steps", type=int, default=400, help="steps to train (a ceiling when --minutes is set)")
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="train for this long instead: the learning rate decays over the time, not the steps",
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=EVAL_WINDOW, help="training sequence length")
    parser.add_argument(
        "--max-position",
        type=int,
        default=16384,
        help="windows start at random chunk-aligned positions below this minus --length "
        "(--from-zero of them at 0), so the sinusoid's positions up to it are all trained",
    )
    parser.add_argument("--from-zero", type=float, default=0.25, help="the share of windows that start at 0")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--gate-lr",
        type=float,
        default=1e-2,
        help="peak learning rate of the gated form's per-head gates (no weight decay)",
    )
    parser.add_argument(
        "--retrieval",
        choices=FORMS,
        default=CONFIG.retrieval,
        help="retrieval form: the package's sum or gated, or an ablation arm (none, linear)",
    )
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embedding-std", type=float, default=0.2, help="std of the embedding's initial weights")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights and optimizer)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--checkpoint-every", type=float, default=60.0, help="seconds between checkpoints in --run")
    parser.add_argument(
        "--run", type=Path, default=None, help="where the run's weights and record go (default: a folder in /tmp)"
    )
    parser.add_argument("--no-finish", action="store_true", help="train only; score and ship later with --finish")
    parser.add_argument(
        "--finish",
        type=Path,
        default=None,
        metavar="RUN",
        help="score RUN's weights on this machine and write the preset and results",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN",
        help="a further phase from RUN's weights (e.g. on longer windows): its steps, time and curve carry on",
    )
    args = parser.parse_args()
    args.models, args.heldout_bytes, args.curve_bytes = ROOT / "models", HELDOUT_BYTES, DEFAULT_EVAL_BYTES
    if args.smoke:
        if args.out == lab.RESULTS:  # a smoke run never replaces the shipped figures
            args.out = Path(tempfile.gettempdir()) / "train-smoke"
        args.steps, args.batch, args.length, args.max_position = 4, 2, 256, 1024
        args.eval_every, args.warmup, args.minutes = 2, 2, None
        args.models, args.heldout_bytes, args.curve_bytes = args.out, 4096, 2048
    args.run = args.run or (args.out / "run" if args.smoke else Path(tempfile.gettempdir()) / "train-run")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.finish is not None:
        finish(args.finish, args.out, args.models, args.heldout_bytes)
        return
    train(args, args.run)
    if not args.no_finish:
        finish(args.run, args.out, args.models, args.heldout_bytes)


def train(args: argparse.Namespace, run: Path) -> None:
    """Train from scratch, writing fp16 weights and the record into `run` every
    `--checkpoint-every` seconds and at the end."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train_files, heldout_files = stdlib_split()
    corpus = torch.from_numpy(np.frombuffer(read_corpus(train_files), dtype=np.uint8).copy()).to(device)
    curve_text = read_corpus(heldout_files, args.curve_bytes)
    print(
        f"train {len(train_files)} files {len(corpus) / 1e6:.1f} MB; held out {len(heldout_files)} files; {device}",
        flush=True,
    )

    model = build_model(args.retrieval)
    earlier = json.loads((args.resume / RECORD).read_text()) if args.resume else None
    if earlier is not None:
        model.load_state_dict({k: v.float() for k, v in load_file(args.resume / WEIGHTS).items()})
    model.to(device)
    # The sinusoid added to the embedding has norm sqrt(hidden / 2) = 11.3, while a GPT-2
    # style 0.02 init gives a token row norm of 0.3: token identity is 3% of the input and
    # the first runs sat at the unigram loss (4.5 bits per byte after 200 steps). 0.2
    # makes it 28% (the original Transformer balances them by scaling the embedding).
    if earlier is None:
        torch.nn.init.normal_(model.embedding.weight, std=args.embedding_std)
    # Matrices decay; biases, norms and the gated form's scales do not. The gates get their
    # own, higher rate: Hugging Face's Infini-attention reproduction found a gate trained at
    # the model's rate barely moves.
    groups = {"decay": [], "rest": [], "gates": []}
    for name, p in model.named_parameters():
        kind = (
            "gates"
            if name.endswith("retrieval_gate")
            else "rest"
            if p.dim() < 2 or "retrieval_norm" in name
            else "decay"
        )
        groups[kind].append(p)
    optimizer = torch.optim.AdamW(
        [
            {"params": groups["decay"], "weight_decay": 0.1, "peak": args.lr},
            {"params": groups["rest"], "weight_decay": 0.0, "peak": args.lr},
            {"params": groups["gates"], "weight_decay": 0.0, "peak": args.gate_lr},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    generator = torch.Generator().manual_seed(args.seed)
    span = torch.arange(args.length + 1, device=device)
    budget = args.minutes * 60 if args.minutes else None
    machine = lab.machine(threads=args.threads)
    record = {
        "model": NAME,
        "config": model.config.to_dict(),
        "retrieval": args.retrieval,
        "command": lab.command(),
        "seed": args.seed,
        "gate_lr": args.gate_lr,
        "batch": args.batch,
        "length": args.length,
        "max_position": args.max_position,
        "from_zero": args.from_zero,
        "lr": args.lr,
        "warmup": args.warmup,
        "threads": args.threads,
        "embedding_std": args.embedding_std,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else machine["processor"],
        "bf16": args.bf16,
        "train_bytes": len(corpus),
        "train_files": len(train_files),
        "heldout_files": len(heldout_files),
        "torch": torch.__version__,
        "curve_bytes": args.curve_bytes,
        "machine": machine,
        "curve": earlier["curve"] if earlier else [],
    }
    # A resumed run counts on from where RUN stopped (its steps, seconds, bytes seen and phases).
    before = (
        {"steps": earlier["steps"], "seconds": earlier["seconds"], "tokens_seen": earlier["tokens_seen"]}
        | {"phases": phases_of(earlier)}
        if earlier
        else {"steps": 0, "seconds": 0.0, "tokens_seen": 0, "phases": []}
    )
    start = last_checkpoint = time.perf_counter()
    step = 0
    while step < args.steps and (budget is None or time.perf_counter() - start < budget):
        model.train()
        offsets = torch.randint(0, len(corpus) - args.length - 1, (args.batch,), generator=generator).to(device)
        batch = corpus[offsets[:, None] + span].long()
        with autocast:
            logits = model.forward_from(
                batch[:, :-1], window_start(args.max_position, args.length, generator, args.from_zero)
            )
        loss = F.cross_entropy(logits.float().reshape(-1, BYTE_VOCAB), batch[:, 1:].reshape(-1))
        elapsed = time.perf_counter() - start
        progress = elapsed / budget if budget else step / args.steps
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(progress, step, group["peak"], args.warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % args.eval_every == 0:
            model.eval()
            point = {
                "step": before["steps"] + step,
                "seconds": round(before["seconds"] + time.perf_counter() - start, 1),
                "train_bpb": round(loss.item() / math.log(2), 4),
                "heldout_bpb": round(bits_per_byte(logits_fn(model, device), curve_text), 4),
            }
            record["curve"].append(point)
            print(json.dumps(point), flush=True)
        if time.perf_counter() - last_checkpoint > args.checkpoint_every:
            checkpoint(model, record, run, step, time.perf_counter() - start, before)
            last_checkpoint = time.perf_counter()
    checkpoint(model, record, run, step, time.perf_counter() - start, before)
    print(
        f"{step} steps, {step * args.batch * args.length / 1e6:.1f} M bytes in "
        f"{(time.perf_counter() - start) / 60:.1f} min -> {run}",
        flush=True,
    )


def phases_of(record: dict) -> list[dict]:
    """The training phases a run's record describes, oldest first (a run before `--resume`
    has one)."""
    keys = ("command", "steps", "seconds", "batch", "length", "lr")
    return record.get("phases") or [{k: record[k] for k in keys}]


def checkpoint(model: BSBRModel, record: dict, run: Path, step: int, seconds: float, before: dict) -> None:
    """The fp16 weights as they ship and the record so far, each replaced whole. `before` is
    what the run resumed from (zeros and no phases for a fresh run)."""
    run.mkdir(parents=True, exist_ok=True)
    phase = {"command": record["command"], "steps": step, "seconds": round(seconds, 1)}
    phase.update(batch=record["batch"], length=record["length"], lr=record["lr"])
    record.update(
        steps=before["steps"] + step,
        seconds=round(before["seconds"] + seconds, 1),
        tokens_seen=before["tokens_seen"] + step * record["batch"] * record["length"],
        phases=[*before["phases"], phase],
    )
    shipped = {k: v.detach().half().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(shipped, run / f"{WEIGHTS}.tmp", metadata={"format": "pt"})
    os.replace(run / f"{WEIGHTS}.tmp", run / WEIGHTS)
    (run / f"{RECORD}.tmp").write_text(json.dumps(record, indent=2) + "\n")
    os.replace(run / f"{RECORD}.tmp", run / RECORD)


def finish(run: Path, out: Path, models: Path, heldout_bytes: int = HELDOUT_BYTES) -> None:
    """Score the run's fp16 weights (loaded as fp32, as the preset loads them) on the first
    `heldout_bytes` of this machine's held-out text, and write the preset (TOML and
    weights) into `models` and the results into `out`."""
    record = json.loads((run / RECORD).read_text())
    model = build_model(record.get("retrieval", "sum"))
    model.load_state_dict({k: v.float() for k, v in load_file(run / WEIGHTS).items()})
    model.eval()
    logits_of = logits_fn(model, torch.device("cpu"))
    heldout = heldout_text(heldout_bytes)
    slice_bpb = bits_per_byte(logits_of, heldout[:DEFAULT_EVAL_BYTES])
    bits = {window: byte_bits(logits_of, heldout, window) for window in SCORED_WINDOWS}
    scores = {}
    compressors = {}
    for window in SCORED_WINDOWS:
        scores[window] = round(float(np.nanmean(bits[window])), 4)
        compressors[window] = compressor_bpb(heldout, window)
        print(f"held-out bits per byte in windows of {window}: {scores[window]} ({compressors[window]})", flush=True)
    models.mkdir(parents=True, exist_ok=True)
    weights = models / f"{NAME}.safetensors"
    weights.write_bytes((run / WEIGHTS).read_bytes())
    write_preset(
        models / f"{NAME}.toml",
        model.config,
        weights.name,
        record["seed"],
        slice_bpb,
        heldout[:DEFAULT_EVAL_BYTES],
        "`, then `".join(p["command"] for p in phases_of(record)),
    )
    record.update(
        heldout_bytes=len(heldout),
        heldout_bpb=scores[EVAL_WINDOW],
        heldout_bpb_by_window={str(k): v for k, v in scores.items()},
        compressors_by_window={str(k): v for k, v in compressors.items()},
        **retrieval_gain(logits_of, heldout, model.config.chunk_size, bits[4096]),
        learned=learned_mix(model) if model.config.retrieval == "gated" else None,
        slice_bytes=len(heldout[:DEFAULT_EVAL_BYTES]),
        slice_bpb=slice_bpb,
        weights_bytes=weights.stat().st_size,
        scored_on=lab.machine(threads=torch.get_num_threads()),
        finish_command=lab.command(),
    )
    lab.write(out, f"train_{NAME}", record, report)
    plot(out, record)
    print(
        f"held-out bits per byte {scores[EVAL_WINDOW]:.4f} ({len(heldout)} bytes, windows of {EVAL_WINDOW}); "
        f"weights {weights.stat().st_size / 2**20:.2f} MiB -> {weights}"
    )


def raw_deflate(data: bytes) -> int:
    """Bytes of gzip -9's deflate stream, without gzip's 18 bytes of header and trailer."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    return len(packer.compress(data) + packer.flush())


def raw_xz(data: bytes) -> int:
    """Bytes of xz -9e's LZMA2 stream, without the .xz container."""
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
    return len(lzma.compress(data, format=lzma.FORMAT_RAW, filters=filters))


def compressor_bpb(text: bytes, window: int) -> dict[str, float]:
    """gzip -9 and xz -9e bits per byte of `text`, each window compressed alone (nothing
    learned beforehand), their raw streams without file headers (a model's code lengths
    have none): what the model's scores stand beside."""
    pieces = [text[i : i + window] for i in range(0, len(text), window)]
    sizes = {"gzip -9": raw_deflate, "xz -9e": raw_xz}
    return {name: round(8 * sum(map(size, pieces)) / len(text), 4) for name, size in sizes.items()}


def write_preset(
    path: Path, config: BSBRConfig, weights: str, seed: int, slice_bpb: float, slice_text: bytes, command: str
) -> None:
    config = "\n".join(
        f"{k} = {json.dumps(v)}"
        for k, v in config.to_dict().items()
        if v is not None
        and k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "chunk_size", "ff_size", "retrieval")
    )
    path.write_text(
        f"# {NAME}: trained, not random. Written by `{command}` (tools/results/train_{NAME}.md).\n"
        f'description = "Byte-level BSBR LM trained on CPython\'s stdlib: 4 layers, hidden 256, 4 heads, chunk 64"\n'
        f"seed = {seed}\n"
        f'weights = "{weights}"  # fp16 safetensors beside this file, loaded as fp32\n'
        f'tokenizer = "bytes"  # token ids are UTF-8 bytes\n'
        f"# Held-out bits per byte of the first {len(slice_text)} held-out bytes (windows of {EVAL_WINDOW}),\n"
        f"# as shipped; tests check the preset still scores this.\n"
        f"heldout_bpb = {slice_bpb!r}\n"
        f'heldout_sha256 = "{hashlib.sha256(slice_text).hexdigest()}"  # of that text, as this machine read it\n'
        f"\n[config]\n{config}\n"
    )


def plot(directory: Path, record: dict) -> None:
    """The loss curve as `directory/train_bsbr-stdlib.png` (the report shows it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = record["curve"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p["step"] for p in curve], [p["train_bpb"] for p in curve], label="train batch")
    ax.plot([p["step"] for p in curve], [p["heldout_bpb"] for p in curve], label="held-out slice")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title(f"{NAME} on {record['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / f"train_{NAME}.png", dpi=100)


def report(record: dict) -> str:
    """The finished run's record as markdown: its phases, scores, compressors and curve."""
    curve = record["curve"]
    rows = "\n".join(f"| {p['step']} | {p['seconds']} | {p['train_bpb']} | {p['heldout_bpb']} |" for p in curve)
    by_window = " / ".join(f"{v}" for v in record["heldout_bpb_by_window"].values())
    windows_ = " / ".join(record["heldout_bpb_by_window"])
    trained = record["machine"]
    scored = record["scored_on"]
    return (
        f"# Training `{NAME}`\n\n"
        + "".join(
            f"- `{p['command']}`: {p['steps']} steps of {p['batch']} x {p['length']} bytes, "
            f"{p['seconds'] / 60:.1f} min\n"
            for p in phases_of(record)
        )
        + "\nScored and shipped by the command at the end.\n\n"
        f"Seed {record['seed']}, {record['steps']} steps, {record['tokens_seen'] / 1e6:.1f} M bytes seen of "
        f"{record['train_bytes'] / 1e6:.1f} M in {record['train_files']} files of Python "
        f"{trained['versions']['python']}'s stdlib, {record['seconds'] / 60:.1f} min on {record['device']}"
        f"{' (bf16 autocast)' if record['bf16'] else ''}, torch {record['torch']}.\n\n"
        f"**Held-out bits per byte in windows of {windows_}: {by_window}** ({record['heldout_bytes']} bytes of "
        f"the held-out files of Python {scored['versions']['python']}'s stdlib on {scored['processor']}, fp16 "
        f"weights as shipped, run in fp32); the first {record['slice_bytes']} bytes (the default `--eval-text`) "
        f"in windows of {EVAL_WINDOW}: {record['slice_bpb']:.4f}.\n"
        f"Weights: {record['weights_bytes'] / 2**20:.2f} MiB fp16, retrieval form `{record['config']['retrieval']}`."
        f"\n\n| | {' | '.join(f'windows of {w}' for w in record['heldout_bpb_by_window'])} |\n"
        f"|---|{'---|' * len(record['heldout_bpb_by_window'])}\n"
        f"| {NAME} | {' | '.join(str(v) for v in record['heldout_bpb_by_window'].values())} |\n"
        + "".join(
            f"| {name} (each window alone) | "
            f"{' | '.join(str(c[name]) for c in record['compressors_by_window'].values())} |\n"
            for name in next(iter(record["compressors_by_window"].values()))
        )
        + f"\nEach {record['config']['chunk_size']}-byte chunk read alone (nothing to retrieve): "
        f"{record['chunk_alone_bpb']} bits per byte; retrieval gains {record['gain_from_retrieval']:+.4f} on the "
        f"same bytes in 4096-byte windows.\n\n"
        + (
            "What the gated retrieval learned, per layer: each head's gate g_h (the retrieved term's share) and "
            "its norm scale's mean:\n\n| layer | gate g_h | norm scale |\n|---|---|---|\n"
            + "".join(
                f"| {r['layer']} | {', '.join(map(str, r['gate']))} | {', '.join(map(str, r['norm_scale_mean']))} |\n"
                for r in record["learned"]
            )
            + "\n"
            if record.get("learned")
            else ""
        )
        + f"The curve's held-out column scores the training machine's own held-out slice (the same rule on "
        f"its stdlib, first {record.get('curve_bytes', DEFAULT_EVAL_BYTES)} bytes, windows of {EVAL_WINDOW}).\n\n"
        f"![loss curve](train_{NAME}.png)\n\n| step | seconds | train bpb | held-out bpb |\n|---|---|---|---|\n{rows}\n"
    )


if __name__ == "__main__":
    main()
