"""What `make mutate` mutates, and the tests that must kill each module's mutants.

Each group is one source file and a pytest selection chosen to run in seconds under the Triton
interpreter while exercising every line of the file: the production-width and multi-block
tests for the kernels, the float64-pinned tests for the optimizer and the trainer. Tests that
start processes (torchrun, the CLI in a subprocess) are left out: a mutant is judged by the
selection alone. ``functions`` limits a file to the named functions (the trainer's loss code).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Group:
    """``module``: a source file; ``tests``: (test file, ``-k`` expression or "" for the whole file) pairs,
    run in that order; ``functions``: only these functions (``Class.method`` or ``name``) are mutated, when given."""

    module: str
    tests: tuple[tuple[str, str], ...]
    functions: tuple[str, ...] = ()

    def pytest_args(self) -> list[str]:
        """The test files and one ``-k`` expression that keeps each file's expression to that file."""
        files = list(dict.fromkeys(path for path, _ in self.tests))
        terms = [f"({Path(path).stem} and ({expr}))" if expr else f"({Path(path).stem})" for path, expr in self.tests]
        return [*files, "-k", " or ".join(terms)]


GROUPS: tuple[Group, ...] = (
    Group("flashsae/kernels/rows.py", (
        ("tests/test_rows.py", "fixed_order or ((production_widths or launchers or adds_the_bias or with_shift) and "
                               "triton and not dtype2) or ((values_and_grads or topk_encode_grads) and triton and dtype0)"),
    )),
    Group("flashsae/kernels/sparse_adam.py", (
        ("tests/test_sparse_adam.py", "triton and (many_touched or uncoalesced or lazy_semantics or "
                                      "every_row_is_touched or bf16)"),
        ("tests/test_precision.py", "triton and (production_widths or master_weight_step)"),
    )),
    Group("flashsae/kernels/reference.py", (
        ("tests/test_ops.py", ""),
        ("tests/test_rows.py", "torch and not dtype2"),
        ("tests/test_sparse_adam.py", "torch"),
        ("tests/test_precision.py", "(torch and not thousand) or split_and_join or reference_scalars"),
    )),
    Group("flashsae/kernels/pairs.py", (("tests/test_pairs.py", ""), ("tests/test_rows.py", "torch and dtype0"))),
    Group("flashsae/kernels/keys.py", (
        ("tests/test_ops.py", ""), ("tests/test_pairs.py", ""), ("tests/test_fused_encode.py", "not k_512"),
    )),
    Group("flashsae/kernels/registry.py", (("tests/test_registry.py", ""), ("tests/test_ops.py", "triton"))),
    Group("flashsae/ops.py", (
        ("tests/test_ops.py", ""), ("tests/test_rows.py", "torch and not dtype2"), ("tests/test_registry.py", ""),
        ("tests/test_rowgrad.py", ""),
    )),
    Group("flashsae/optim.py", (
        ("tests/test_sparse_adam.py", "torch"), ("tests/test_precision.py", "torch and not thousand"),
        ("tests/test_rowgrad.py", ""),
    )),
    Group("flashsae/sae/losses.py", (("tests/test_trainer_step.py", ""), ("tests/test_train.py", "aux_k"))),
    Group("flashsae/sae/trainer.py", (
        ("tests/test_trainer_step.py", ""), ("tests/test_train.py", "aux_k or deferred or nan or lowers_fvu"),
    ), functions=("Trainer._device_step", "Trainer._aux_k_loss", "Trainer._aux_active", "Trainer._note_nonfinite",
                  "Trainer.check_finite", "Trainer.read_metrics")),
)
