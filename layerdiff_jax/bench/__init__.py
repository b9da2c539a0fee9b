"""The benchmark suite behind `scripts/bench.py`: rows in `suite`, timing and memory in `measure`, the
PyTorch reference in `torch_reference` (imported only when a row runs), the table in `report`."""

from layerdiff_jax.bench.report import format_table, write_json
from layerdiff_jax.bench.suite import BenchSettings, run_suite

__all__ = ["BenchSettings", "format_table", "run_suite", "write_json"]
