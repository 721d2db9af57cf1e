"""The kit's own tooling, not part of any lesson: the notebook harness (`harness`: manifest, papermill
runner, report, `.ipynb` pairing), the metric recorder and comparator (`record`), README rendering
(`readme`), the benchmarks (`bench`, run by `benchmarks/run.py`) and the `uniir-lite` command (`cli`).

What a student imports lives one level up, in `uniir_lite`."""
