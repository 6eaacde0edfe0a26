"""Proving artifacts against the eager model: runners, parity, localization, doctor, optimization
levels and reduced precision judged by loss, benchmarks and reports."""
