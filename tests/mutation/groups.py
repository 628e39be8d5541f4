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
    ``functions``: only these functions (``Class.method`` or ``name``) are mutated, when given; ``shards``: the
    module's lines split into this many contiguous parts, each run as its own job (a long group spread over
    the workers; not with ``functions``)."""

    module: str
    tests: tuple[tuple[str, str], ...]
    functions: tuple[str, ...] = ()
    shards: int = 1

    def pytest_args(self) -> list[str]:
        """The test paths in order and one ``-k`` expression that keeps each path's expression to its tests."""
        paths = list(dict.fromkeys(path for path, _ in self.tests))
        terms = [f"({_name(path)} and ({expr}))" if expr else f"({_name(path)})" for path, expr in self.tests]
        return [*paths, "-k", " or ".join(terms)]


def _name(path: str) -> str:
    """The keyword that names a path's tests: the test function of ``file::test``, else the file's stem."""
    return path.split("::")[1] if "::" in path else Path(path).stem


ROWS, ADAM, PRECISION = "tests/test_rows.py", "tests/test_sparse_adam.py", "tests/test_precision.py"
ENCODERS, FUSED, AUX = "tests/test_encoders.py", "tests/test_fused_encode.py", "tests/test_aux_fold.py"
VARIANTS, OPS = "tests/test_variants_ops.py", "tests/test_ops.py"
CPU_KERNELS = "tests/test_cpu_kernels.py"
# Longest first: the workers take groups in this order, so the short ones fill in at the end.
GROUPS: tuple[Group, ...] = (
    Group("flashsae/ops.py", (
        # (the torch encoder's memory is torch_encode.py's; autocast is ops.py's on any backend)
        (OPS, "not memory_stays and not (autocast and triton)"),
        (VARIANTS, "not triton"), (AUX, "not triton and not fused and not chunked"),
        (ROWS, "torch and not dtype2"),
        ("tests/test_registry.py", "not triton_is_not_imported"),  # (a subprocess: 4 s, and ops.py imports no Triton)
        ("tests/test_rowgrad.py", ""),
    ), shards=2),
    Group("flashsae/kernels/reference.py", (
        (PRECISION, "(torch and not thousand) or split_and_join or reference_scalars"),
        (ROWS, "torch and not dtype2"),
        (ADAM, "torch"),
        (f"{OPS}::test_every_chunked_loop_of_the_torch_backend_matches_float64", ""),
        (f"{OPS}::test_float64_end_to_end_matches_dense_autograd_and_sparse_adam_steps_in_float64", ""),
        (CPU_KERNELS, "adam"),
    )),
    Group("flashsae/kernels/torch_encode.py", (
        (f"{ENCODERS}::test_production_widths_with_a_few_rows", "torch"),
        (ENCODERS, "torch or static"), (f"{AUX}::test_folded_aux_selection_equals_the_masked_selection", "torch"),
        (f"{OPS}::test_every_chunked_loop_of_the_torch_backend_matches_float64", ""),
        (f"{OPS}::test_topk_encode_chunked_sweep_equals_one_chunk", ""),
        (f"{OPS}::test_torch_encoder_threads_do_not_share_its_pre_activation_buffer", ""),
        (CPU_KERNELS, "not adam"),
    )),
    Group("flashsae/kernels/cpu_native.py", ((CPU_KERNELS, ""),)),
    Group("flashsae/kernels/fused_encode.py", (
        (f"{FUSED}::test_block_configs_are_tiles_the_compiler_and_the_plan_accept", ""),
        (f"{ENCODERS}::test_production_widths_with_a_few_rows", "384-triton-fused"),
        (f"{ENCODERS}::test_random_inputs_match_float64_topk", "(3-40-777-5 or 7-40-1000-5) and fused"),
        (f"{ENCODERS}::test_lists_compacted_on_almost_every_tile_stay_exact", "fused"),
        (f"{ENCODERS}::test_nan_pre_activations_count_as_minus_infinity", "fused"),
        (f"{ENCODERS}::test_large_k_up_to_k_equal_to_f", "1500-triton-fused"),
        (f"{ENCODERS}::test_no_tokens_give_empty_outputs", "fused"),
        (f"{ENCODERS}::test_triton_backends_reject_float64_naming_the_argument", "fused"),
        (f"{ENCODERS}::test_fused_plan_fills_whole_waves_and_bounds_the_lists", ""),
        (f"{FUSED}::test_plan_bounds_lists_and_covers_every_feature", ""),
        (f"{FUSED}::test_k_equal_to_n_features_selects_every_feature", ""),
        (f"{ENCODERS}::test_dyadic_inputs_give_the_reference_exactly", "dtype0-triton-fused"),
    )),
    Group("flashsae/kernels/chunked_encode.py", (
        (f"{ENCODERS}::test_production_widths_with_a_few_rows", "768-triton and not fused"),
        (f"{ENCODERS}::test_lists_compacted_on_almost_every_tile_stay_exact", "triton and not fused"),
        (f"{ENCODERS}::test_random_inputs_match_float64_topk", "3-40-777-5 and triton and not fused"),
        (f"{ENCODERS}::test_chunked_buffer_smaller_than_one_chunk_still_covers_every_feature", "13200"),
        (f"{ENCODERS}::test_nan_pre_activations_count_as_minus_infinity", "triton and not fused"),
        (f"{ENCODERS}::test_large_k_up_to_k_equal_to_f", "1500-triton and not fused"),
        (f"{ENCODERS}::test_no_tokens_give_empty_outputs", "triton and not fused"),
        (f"{ENCODERS}::test_chunked_plan_bounds_the_buffer_and_fills_the_grid", ""),
        (f"{AUX}::test_folded_aux_selection_equals_the_masked_selection", "triton-3-40-777"),
        (f"{ENCODERS}::test_dyadic_inputs_give_the_reference_exactly", "dtype0-triton and not fused"),
    )),
    Group("flashsae/kernels/triton_common.py", (
        (f"{ENCODERS}::test_fold_pre_bias_matches_float64_and_writes_only_its_output", ""),
        (f"{ENCODERS}::test_production_widths_with_a_few_rows", "768-triton and not fused"),
        (f"{ENCODERS}::test_an_infinite_pre_activation_is_the_largest", "triton"),
        (f"{ENCODERS}::test_lists_compacted_on_almost_every_tile_stay_exact", ""),
        (f"{ENCODERS}::test_a_compaction_that_leaves_no_survivor_keeps_all_k_best", ""),
        (f"{ENCODERS}::test_a_second_compaction_reads_only_the_lists_own_keys", ""),
        (f"{ENCODERS}::test_a_compaction_at_a_tie_keeps_exactly_k_keys_and_the_list_room_for_a_tile", ""),
        (f"{ENCODERS}::test_a_tile_with_a_single_survivor_appends_it", ""),
        (f"{ENCODERS}::test_nan_pre_activations_count_as_minus_infinity", "triton"),
        (f"{ENCODERS}::test_random_inputs_match_float64_topk", "3-40-777-5 and triton"),
        (f"{ENCODERS}::test_large_k_up_to_k_equal_to_f", "1500 and triton"),
        (f"{ENCODERS}::test_rows_without_enough_positives_fill_zeros_at_lowest_indices", "dtype0-triton and not fused"),
        (f"{ENCODERS}::test_dyadic_inputs_give_the_reference_exactly", "dtype0-triton and not fused"),
    )),
    Group("flashsae/kernels/rows.py", (
        (f"{ROWS}::test_row_primitives_at_production_widths_with_heavy_single_and_silent_features", "triton and 768 and dtype0"),
        (f"{ROWS}::test_triton_primitives_at_one_and_zero_tokens_columns_and_slots_equal_the_reference", ""),
        (f"{ROWS}::test_segment_slices_are_the_widest_power_of_two_with_little_masked_tail", ""),
        (f"{ROWS}::test_triton_launchers_write_every_output_element", "dtype0"),
        (f"{ROWS}::test_gather_rows_adds_the_bias_and_writes_a_given_output_in_its_dtype", "triton and dtype0"),
        (f"{ROWS}::test_segment_rows_with_shift_matches_float64_shifted_sums", "triton and dtype0"),
        (f"{ROWS}::test_segment_rows_sums_each_feature_in_one_fixed_order_bit_for_bit", ""),
        (f"{ROWS}::test_row_primitives_at_production_widths_with_heavy_single_and_silent_features", "triton and 4096 and dtype0"),
        (f"{ROWS}::test_triton_launchers_write_every_output_element", "dtype1"),
    )),
    Group("flashsae/kernels/sparse_adam.py", (
        (f"{PRECISION}::test_sparse_adam_on_padded_row_grads_matches_float64_at_production_widths", "triton and 768"),
        (f"{PRECISION}::test_a_zero_step_keeps_every_master_bit_pattern_and_leaves_rows_unnormalized", "triton"),
        (f"{PRECISION}::test_the_triton_master_weight_step_is_the_torch_step", "384"),
        (f"{ADAM}::test_many_touched_rows_of_a_wide_parameter_match_float64_lazy_adam",
         "triton and (row-grad-False or dense-False or row-grad-True)"),
        (ADAM, "triton and (lazy_semantics or every_row_is_touched or bf16)"),
    )),
    Group("flashsae/sae/trainer.py", (
        ("tests/test_trainer_step.py", ""), ("tests/test_train.py", "aux_k or deferred or nan or lowers_fvu"),
        ("tests/test_variants_model.py",
         "threshold_is_the_moving_average or transcoder_steps_need_their_target or matryoshka_levels_fvu"),
    ), functions=("Trainer._device_step", "Trainer._aux_k_loss", "Trainer._aux_active", "Trainer._note_nonfinite",
                  "Trainer.check_finite", "Trainer.read_metrics")),
    Group("flashsae/optim.py", (
        (ADAM, "not triton"), (PRECISION, "torch and not thousand"), ("tests/test_rowgrad.py", ""),
    )),
    Group("flashsae/kernels/batch_select.py", (
        (f"{VARIANTS}::test_batch_topk_matches_the_float64_batch_reference", ""),
        (f"{VARIANTS}::test_candidate_count_is_bounded_by_the_features_and_the_largest_k", ""),
        (f"{VARIANTS}::test_padded_rows_of_an_empty_batch_and_of_a_row_next_to_one_holding_every_feature", ""),
        (f"{VARIANTS}::test_saturated_rows_are_searched_again_and_the_selection_is_exact", ""),
        (f"{VARIANTS}::test_a_cut_below_one_still_searches_the_rows_holding_the_top_entries", ""),
        (f"{VARIANTS}::test_the_search_of_saturated_rows_sweeps_every_feature_in_small_chunks", ""),
        (f"{VARIANTS}::test_ties_at_the_batch_threshold_go_to_the_lower_row_then_the_lower_feature", ""),
        (f"{VARIANTS}::test_fewer_positives_than_the_budget_selects_them_all_and_empty_rows_fill_with_zeros", ""),
        (f"{VARIANTS}::test_nothing_positive_gives_one_zero_slot_per_row", ""),
        (f"{VARIANTS}::test_threshold_encode_keeps_every_entry_strictly_above_the_threshold", ""),
        (f"{VARIANTS}::test_threshold_encode_cut_is_strict_at_exact_values", ""),
        (f"{VARIANTS}::test_batch_selections_backpropagate_like_dense_autograd_on_the_chosen_entries", ""),
        (f"{AUX}::test_batch_topk_fold_equals_batch_selection_and_masked_aux", ""),
        (f"{VARIANTS}::test_the_triton_backend_selects_across_the_batch_as_the_torch_backend", ""),
    )),
    Group("flashsae/kernels/pairs.py", (("tests/test_pairs.py", ""), (ROWS, "torch and dtype0"))),
    Group("flashsae/kernels/registry.py", (
        ("tests/test_registry.py", "not triton_is_not_imported and not run_only_through_backend_primitives"),
        (f"{AUX}::test_registry_declares_which_backends_fold", ""),
        ("tests/test_registry.py::test_ops_and_optimizer_run_only_through_backend_primitives", ""),
    )),
    Group("flashsae/kernels/keys.py", (
        ("tests/test_keys.py", ""),
        (f"{ENCODERS}::test_dyadic_inputs_give_the_reference_exactly", "dtype0-torch"),
        (f"{ENCODERS}::test_nan_pre_activations_count_as_minus_infinity", "torch or fused"),
    )),
    Group("flashsae/sae/losses.py", (("tests/test_trainer_step.py", ""), ("tests/test_train.py", "aux_k"))),
)
