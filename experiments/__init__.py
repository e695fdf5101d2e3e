"""Small-scale reproductions of the papers behind leanserve's model family.

Each module is one command, `python -m experiments.<name> [--quick] [--out DIR]`,
that trains its models on the bundled World English Bible, evaluates them and
writes `experiments/reports/<name>.md` with a table, a PNG plot, the exact
command, the wall time and the differences from the paper. `experiments.common`
is the shared harness (data cache, train-and-eval helper, report writer).
"""
