"""The GPU acceptance check: ``make gpu-check`` (``python3 -m benchmarks.gpu_check --out DIR``).

One command, within one time budget (8 minutes by default), on a GPU machine with its own torch and
Triton and nothing to download: compiled correctness of every kernel backend against float64
references (phase 1, `correctness`), the headline timings beside their floors and the largest F
each system trains (phase 2, `performance`), and `flashsae rank` plus a short ASI vs random run on
MiniLM through the command line (phase 3, `science`). Each phase runs in a process of its own for
its slice of the budget (`budget`), writing every result as it happens (`records`); `report`
turns them into at most 8 files. `carry` prepares what a bare machine lacks; `--dry-run` runs it
all at tiny sizes on the CPU (tests/test_gpu_check.py). See benchmarks/README.md.
"""
