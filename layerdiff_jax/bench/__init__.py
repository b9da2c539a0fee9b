"""The benchmarks behind `scripts/bench.py`: the standard suite's rows in `suite`, the time-boxed accelerator
check in `check`, timing and memory in `measure`, the PyTorch reference in `torch_reference` (imported only
when a row runs), the table and JSON in `report`, what a run needs installed in `requirements`.

Nothing is imported here, so that `requirements` can say what is missing before anything else is imported."""
