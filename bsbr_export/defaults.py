"""The defaults every stage shares, each stated once: the CLI's flags, export's
self-check, validate, optimize and bench all read them here."""

# fp32 max abs error allowed against eager, relative to the logit scale (max |output|, at least 1).
DEFAULT_TOLERANCE = 1e-4
# Other precisions carry their own rounding: fp16 ~1e-3 relative per op; int8 dynamic
# quantization moves logits by up to ~0.1 of their scale (its top-1 agreement is reported).
# bf16 keeps 8 mantissa bits (~4e-3 relative per op). For byte-level LMs held-out bits
# per byte judge them instead (proof/evaltext.py).
PRECISION_TOLERANCES = {"fp16": 1e-2, "bf16": 5e-2, "int8": 0.25}

# Held-out bits per byte may rise at most 1% over eager's.
DEFAULT_ACCURACY_BUDGET = 0.01
# Window length of held-out text scoring, and the windows reduced precision is judged
# at: its error moves with the window (int8 here loses most in short ones, bf16 at long
# positions), so a plan holds only if it holds at each.
EVAL_WINDOW = 512
DEFAULT_EVAL_WINDOWS = (EVAL_WINDOW, 4096)

# Threads each engine computes with (bench, optimize, the tools' timings): the cores of the
# 2-core machines this was measured on; pass --threads to use more.
DEFAULT_THREADS = 2

# ONNX Runtime's graph optimization levels, weakest first (bench times each, optimize picks one).
OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")

# ONNX opset of exports unless asked otherwise: 23 has the fused Attention op that the
# within-chunk SDPA exports to (below 23 the exporter spells it out as MatMul, Where and
# Softmax, ~1.8x slower on ONNX Runtime's CPU provider).
DEFAULT_OPSET = 23

# Tokens per serving iteration while generations run (`runtime.batching.Batcher`, as vLLM's
# max_num_batched_tokens): each generating sequence takes one, joining prompts share the
# rest in whole chunks; measured in tools/results/scheduler_load.md.
DEFAULT_TOKEN_BUDGET = 128

# What one serving process (a Triton step or generate model, the OpenAI server) holds at
# once: open sequences, the bytes of their state, and the longest prompt it takes; past a
# limit a request is refused with a message, never queued without bound.
MAX_SEQUENCES = 1024
MAX_STATE_BYTES = 4 << 30
MAX_PROMPT_TOKENS = 65536

# The most tokens whose finished chunks a sequence gets room for when it opens
# (`runtime.state.reserved_chunks`): a generation asked for "forever" takes no more address
# space up front than the longest prompt's state; past it the buffer grows.
MAX_RESERVED_TOKENS = MAX_PROMPT_TOKENS
