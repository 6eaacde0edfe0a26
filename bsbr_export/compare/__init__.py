"""Comparison, written once: outputs against a reference (`parity`), and which inputs
to compare them on (`cases`). Export's self-check, validate, optimize and bench all
call it; it takes runners as arguments and imports none."""
