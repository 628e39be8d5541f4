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
    """``module``: a source file; ``tests``: (test file or ``file::test``, ``-k`` expression or "" for all of
    it) pairs, run in that order (the quickest killers first: pytest stops at the first failure);
    ``functions``: only these functions (``Class.method`` or ``name``) are mutated, when given."""

    module: str
    tests: tuple[tuple[str, str], ...]
    functions: tuple[str, ...] = ()

    def pytest_args(self) -> list[str]:
        """The test paths in order and one ``-k`` expression that keeps each path's expression to its tests."""
        paths = list(dict.fromkeys(path for path, _ in self.tests))
        terms = [f"({_name(path)} and ({expr}))" if expr else f"({_name(path)})" for path, expr in self.tests]
        return [*paths, "-k", " or ".join(terms)]


def _name(path: str) -> str:
    """The keyword that names a path's tests: the test function of ``file::test``, else the file's stem."""
    return path.split("::")[1] if "::" in path else Path(path).stem


ROWS, ADAM, PRECISION = "tests/test_rows.py", "tests/test_sparse_adam.py", "tests/test_precision.py"
ENCODERS = "tests/test_encoders.py"
GROUPS: tuple[Group, ...] = (
    Group("flashsae/kernels/rows.py", (
        (f"{ROWS}::test_row_primitives_at_production_widths_with_heavy_single_and_silent_features", "triton and not dtype2"),
        (f"{ROWS}::test_triton_launchers_write_every_output_element", "not dtype2"),
        (f"{ROWS}::test_segment_rows_sums_each_feature_in_one_fixed_order_bit_for_bit", ""),
        (f"{ROWS}::test_gather_rows_adds_the_bias_and_writes_a_given_output_in_its_dtype", "triton and not dtype2"),
        (f"{ROWS}::test_segment_rows_with_shift_matches_float64_shifted_sums", "triton and not dtype2"),
        (f"{ROWS}::test_sparse_decode_values_and_grads_match_float64_autograd", "triton and dtype0"),
        (f"{ROWS}::test_topk_encode_grads_match_float64_autograd", "triton and dtype0"),
    )),
    Group("flashsae/kernels/sparse_adam.py", (
        (f"{ADAM}::test_many_touched_rows_of_a_wide_parameter_match_float64_lazy_adam", "triton"),
        (f"{ADAM}::test_uncoalesced_accumulated_sparse_gradients_are_summed_per_row", "triton"),
        (f"{PRECISION}::test_sparse_adam_on_padded_row_grads_matches_float64_at_production_widths", "triton"),
        (f"{PRECISION}::test_the_triton_master_weight_step_is_the_torch_step", ""),
        (ADAM, "triton and (lazy_semantics or every_row_is_touched or bf16)"),
    )),
    Group("flashsae/kernels/reference.py", (
        ("tests/test_ops.py", ""),
        (ROWS, "torch and not dtype2"),
        (ADAM, "torch"),
        (PRECISION, "(torch and not thousand) or split_and_join or reference_scalars"),
    )),
    Group("flashsae/kernels/torch_encode.py", ((ENCODERS, "torch or static"), ("tests/test_ops.py", ""))),
    Group("flashsae/kernels/chunked_encode.py", ((ENCODERS, "(triton and not fused) or chunked"),)),
    Group("flashsae/kernels/fused_encode.py", (
        (ENCODERS, "fused"), ("tests/test_fused_encode.py", "not k_512"),
    )),
    Group("flashsae/kernels/triton_common.py", ((ENCODERS, "triton"), ("tests/test_fused_encode.py", "not k_512"))),
    Group("flashsae/kernels/pairs.py", (("tests/test_pairs.py", ""), (ROWS, "torch and dtype0"))),
    Group("flashsae/kernels/keys.py", (
        ("tests/test_ops.py", ""), ("tests/test_pairs.py", ""), ("tests/test_fused_encode.py", "not k_512"),
    )),
    Group("flashsae/kernels/registry.py", (("tests/test_registry.py", ""), ("tests/test_ops.py", "triton"))),
    Group("flashsae/ops.py", (
        ("tests/test_ops.py", ""), (ROWS, "torch and not dtype2"), ("tests/test_registry.py", ""),
        ("tests/test_rowgrad.py", ""),
    )),
    Group("flashsae/optim.py", (
        (ADAM, "not triton"), (PRECISION, "torch and not thousand"), ("tests/test_rowgrad.py", ""),
    )),
    Group("flashsae/sae/losses.py", (("tests/test_trainer_step.py", ""), ("tests/test_train.py", "aux_k"))),
    Group("flashsae/sae/trainer.py", (
        ("tests/test_trainer_step.py", ""), ("tests/test_train.py", "aux_k or deferred or nan or lowers_fvu"),
    ), functions=("Trainer._device_step", "Trainer._aux_k_loss", "Trainer._aux_active", "Trainer._note_nonfinite",
                  "Trainer.check_finite", "Trainer.read_metrics")),
)
