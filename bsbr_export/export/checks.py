"""What every artifact must pass before it is written: a kind its module can give,
and agreement with eager at lengths, batches and states it was not exported with."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from bsbr_export.compare.cases import default_cases, self_check_length
from bsbr_export.compare.parity import check_parity
from bsbr_export.errors import UserError
from bsbr_export.model.spec import ModelSpec
from bsbr_export.runtime.base import Runner
from bsbr_export.runtime.eager import EagerRunner


class ExportError(RuntimeError):
    """An export produced something wrong (a bug on our side, not a user mistake)."""


class DoesNotGeneralize(UserError):
    """The module exports, but the graph is frozen to the example's shapes (a Python loop
    over chunks, float math on sizes, `.item()`): the user's code must change."""


# The method a module needs for each step kind beyond the full-state streaming step.
STEP_METHODS = {"decode": "stream_update", "rows": "step_rows"}

FREEZE_HINT = (
    "`bsbr-export doctor` names the line that freezes it (a Python loop over chunks, math.ceil on a "
    "size, .item(), a reshape before padding), or build on bsbr_export.nn.BSBRAttention"
)


def check_kind(model, spec: ModelSpec, kind: str) -> None:
    """UserError when `model` cannot give the artifact kind (it does not stream)."""
    if kind == "full":
        return
    if not spec.causal:
        raise UserError(f"this model is not causal, so it cannot stream; drop --streaming ({spec.note})")
    if spec.state is None:
        raise UserError(
            f"{type(model).__name__} does not implement the streaming protocol (init_state(batch) and "
            "stream(inputs, state) -> (outputs, state)): drop --streaming"
        )
    method = STEP_METHODS.get(kind)
    if method and not callable(getattr(model, method, None)):
        raise UserError(f"{type(model).__name__} has no {method}: it has no {kind} graph")
    if kind == "rows" and spec.chunk_size < 2:
        raise UserError("with chunk size 1 every token closes its chunk: there is no row step (it needs c >= 2)")


def check_generalizes(
    model: nn.Module, make_runner: Callable[[list[str], list[str]], Runner], kind: str, spec: ModelSpec, what: str
) -> None:
    """DoesNotGeneralize unless the artifact that `make_runner(input_names, output_names)`
    runs matches eager on every output at lengths, batches and (streamed) states it was
    not exported with; `what` names it in the message ("TorchScript trace")."""
    reference = EagerRunner(model, spec, kind)
    runner = make_runner(reference.input_names, reference.output_names)
    cases = default_cases(spec.chunk_size, kind, long_length=self_check_length(spec.chunk_size))
    try:
        report = check_parity(what, reference, runner, cases, spec, precise=reference.in_float64)
    except UserError:
        raise
    except Exception as exc:  # the artifact cannot even run at another shape (ORT raises its own Fail types)
        raise DoesNotGeneralize(
            f"the {what} of {type(model).__name__} fails away from the example's shape "
            f"({str(exc).strip().splitlines()[0][:200]}); {FREEZE_HINT}"
        ) from None
    if not report:
        raise DoesNotGeneralize(
            f"the {what} of {type(model).__name__} disagrees with eager: "
            + "; ".join(report.failures[:3])
            + f"; {FREEZE_HINT}"
        )
