"""A runner over an artifact file, found through its format's row (`formats.FORMATS`)."""

from bsbr_export.formats import FORMATS, resolve
from bsbr_export.runtime.base import Runner


def open_artifact(fmt: str, path, input_names: list[str], output_names: list[str], **options) -> Runner:
    """A runner over an artifact file of format `fmt`, named as the graph it mirrors: the
    row's runner class, built as cls(path, input_names, output_names, **options)."""
    return resolve(FORMATS[fmt].runner)(path, input_names, output_names, **options)
