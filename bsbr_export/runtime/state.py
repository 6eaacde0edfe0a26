"""A streaming graph's state between calls, as numpy arrays: how it starts and how a
step's outputs advance it. One rule for every caller (generation, parity checks, bench)."""

from __future__ import annotations

import numpy as np


def empty_state_tensor(shape: list, batch: int) -> np.ndarray:
    """One tensor of the initial (empty) state: its named dims are 0 except `batch`."""
    dims = [batch if d == "batch" else (d if isinstance(d, int) else 0) for d in shape]
    return np.zeros(dims, dtype=np.float32)


def advance_state(state: dict[str, np.ndarray], outputs: dict[str, np.ndarray], axis: int = 2) -> dict[str, np.ndarray]:
    """The `past.*` feeds for the next step: `present.*` outputs replace their entry; a
    decode graph's `new.*` rows (chunks it finished) are appended along `axis`, and only
    when there are any, so a step that finishes no chunk copies nothing."""
    advanced = {}
    for name, value in state.items():
        appended = outputs.get(name.replace("past.", "new.", 1))
        if appended is None:
            advanced[name] = outputs[name.replace("past.", "present.", 1)]
        else:
            advanced[name] = np.concatenate([value, appended], axis=axis) if appended.shape[axis] else value
    return advanced
