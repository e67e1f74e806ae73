"""The planted-bug check: small plausible bugs, one per derived figure and per layer, each applied alone to a
scratch copy of the repository and run against the tests that should catch it.

    python tests/planted_bugs.py            # every bug; prints which were caught, exits 1 if one was not
    python tests/planted_bugs.py --list     # the bugs, without running anything
    python tests/planted_bugs.py squash     # only bugs whose name contains "squash"

Run it before committing a change to the code a bug names or to its tests (it takes minutes, so CI runs only
``tests/test_planted_bugs.py``, which checks that every bug still applies to the code).  A bug that is no
longer caught is a test to mend; a bug whose text no longer matches is a line of this list to update.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# the contract's parity test of one implementation in float32 on the small network: append "[NAME-float32]"
FLOAT32_PARITY = "tests/test_contract.py::test_parity_with_the_float64_reference"


@dataclass(frozen=True)
class Bug:
    """Replace ``old`` (which occurs exactly once in ``path``) by ``new``; ``tests`` must then fail."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


BUGS = (
    # layers: forward and hand-written backward
    Bug("squash backward keeps only the diagonal", "implementations/numpy/routing.py",
        "    return scale * grad_v + (2.0 * slope * along) * s", "    return scale * grad_v",
        ("tests/test_numpy_capsnet.py::test_squash_backward_is_the_full_vector_jacobian",)),
    Bug("numpy routing normalises the couplings over the input capsules", "implementations/numpy/routing.py",
        "coupling = softmax(xp, logits, axis=1)  # over the output",
        "coupling = softmax(xp, logits, axis=2)  # over the output",
        ("tests/test_contract.py::test_parity_with_the_float64_reference",)),
    Bug("torch routing normalises the couplings over the input capsules", "implementations/torch/routing.py",
        "logits.shape[1])\n            else:\n                coupling = torch.softmax(logits, dim=1)",
        "logits.shape[1])\n            else:\n                coupling = torch.softmax(logits, dim=2)",
        ("tests/test_torch_capsnet.py::test_coupling_is_a_softmax_over_output_capsules",)),
    Bug("PrimaryCaps capsules as a plain view of the channels", "implementations/torch/autograd.py",
        "capsules = conv_output.reshape(batch, types, dim, height, width).permute(0, 1, 3, 4, 2)",
        "capsules = conv_output.reshape(batch, types, height, width, dim)",
        ("tests/test_torch_capsnet.py::test_primary_capsules_take_the_channels_of_one_type_at_one_pixel",)),
    Bug("convolution bias gradient averaged", "implementations/numpy/capsnet.py",
        "    grad_bias = grad_rows.sum(axis=0)", "    grad_bias = grad_rows.mean(axis=0)",
        ("tests/test_numpy_capsnet.py::test_convolution_matches_torch_and_its_backward_finite_differences",)),
    Bug("capsule length gradient without the division by the length", "implementations/numpy/capsnet.py",
        "v * (grad_lengths / safe)[..., None]", "v * grad_lengths[..., None]",
        ("tests/test_numpy_capsnet.py::test_lengths_backward_is_zero_at_a_zero_capsule",)),
    Bug("decoder ReLU mask lets negative pre-activations through", "implementations/numpy/capsnet.py",
        "            grad = grad * (outputs[index] > 0)", "            grad = grad * (outputs[index] >= 0)",
        ("tests/test_numpy_capsnet.py::test_decoder_backward",)),
    Bug("margin loss gradient halved", "implementations/numpy/capsnet.py",
        "(-2.0 * target * present", "(-1.0 * target * present",
        ("tests/test_numpy_capsnet.py::test_losses_backward",)),
    Bug("reconstruction loss gradient not averaged over the batch", "implementations/numpy/capsnet.py",
        "(2.0 * config.reconstruction_weight / pixels.shape[0])", "(2.0 * config.reconstruction_weight)",
        ("tests/test_numpy_capsnet.py::test_losses_backward",)),
    Bug("Adam without bias correction of the first moment", "implementations/numpy/capsnet.py",
        "return rate / (1.0 - ADAM.beta1**step), math.sqrt", "return rate, math.sqrt",
        ("tests/test_contract.py::test_parity_with_the_float64_reference",)),
    Bug("the NumPy optimizer ignores the learning-rate schedule", "implementations/numpy/capsnet.py",
        "rate = self.schedule.rate(self._adam_steps)", "rate = self.schedule.initial",
        ("tests/test_contract.py::test_parity_with_the_float64_reference",)),
    Bug("backward builds new gradients while the old are held", "implementations/numpy/capsnet.py",
        "        self.grads = {}  # the previous gradients go", "        pass  # the previous gradients go",
        ("tests/test_numpy_capsnet.py::test_backward_releases_the_previous_gradients_before_building_new_ones",)),
    Bug("routing alone copies u_hat inside the timed call", "implementations/numpy/capsnet.py",
        "v, _ = self.routing_functions.forward(self.xp, u_hat,",
        "v, _ = self.routing_functions.forward(self.xp, u_hat.copy(),",
        ("tests/test_contract.py::test_u_hat_comes_in_the_layout_its_routing_consumes",)),
    Bug("a resumed NumPy run restarts Adam's step count", "implementations/numpy/capsnet.py",
        '        self._adam_steps = int(state["step"])', "        self._adam_steps = 0",
        ("tests/test_contract.py::test_adam_state_resumes_a_run_exactly",)),
    # derived figures
    Bug("FLOPs: the first routing iteration's softmax counted", "harness/measure/flops.py",
        "softmax = softmax_flops(n_in, n_out) if r > 1 else 0", "softmax = softmax_flops(n_in, n_out)",
        ("tests/test_flops.py",)),
    Bug("FLOPs: the agreement's addition to the logits left out", "harness/measure/flops.py",
        "agreement = product + n_in * n_out if r < last else 0", "agreement = product if r < last else 0",
        ("tests/test_flops.py",)),
    Bug("FLOPs: Adam at 10 per parameter", "harness/measure/flops.py", "ADAM_FLOPS_PER_PARAMETER = 12",
        "ADAM_FLOPS_PER_PARAMETER = 10", ("tests/test_flops.py",)),
    Bug("memory: u_hat counted without its capsule dimension", "harness/measure/expected_memory.py",
        '"u_hat": c.num_primary_caps * c.num_classes * c.digit_caps_dim,',
        '"u_hat": c.num_primary_caps * c.num_classes,',
        ("tests/test_flops.py::test_activation_memory_hand_count",)),
    Bug("memory: im2col of PrimaryCaps with the kernel not squared", "harness/measure/expected_memory.py",
        "primary = c.primary_size**2 * c.primary_kernel**2 * c.conv1_channels",
        "primary = c.primary_size**2 * c.primary_kernel * c.conv1_channels",
        ("tests/test_flops.py::test_activation_memory_hand_count",)),
    Bug("GEMM peak counts a multiply-add as one FLOP", "harness/measure/peak.py", "return 2 * n**3 / seconds / 1e9",
        "return n**3 / seconds / 1e9", ("tests/test_flops.py::test_gemm_peak_is_2n_cubed_over_the_best_time",)),
    Bug("hardware peak counts an FMA as one FLOP", "harness/measure/peak.py",
        "gflops = cores * lanes * units * 2 * clock_ghz if known else None",
        "gflops = cores * lanes * units * clock_ghz if known else None",
        ("tests/test_flops.py::test_hardware_peak_is_cores_lanes_fma_units_two_and_the_clock",)),
    Bug("an FMA microbenchmark's count takes one FLOP per FMA", "harness/measure/fma_peak.py",
        "return 2.0 * ACCUMULATORS * lanes * iterations * calls",
        "return 1.0 * ACCUMULATORS * lanes * iterations * calls",
        ("tests/test_fma_peak.py::test_flops_count_two_per_lane_per_accumulator_per_iteration",)),
    Bug("Zen 4's AVX-512 counted as two 512-bit FMA units", "harness/measure/peak.py",
        'return 1, "Zen 4 executes AVX-512 as 2 x 256-bit: one 512-bit FMA per cycle"',
        'return 2, "Zen 4 executes AVX-512 as 2 x 256-bit: one 512-bit FMA per cycle"',
        ("tests/test_flops.py::test_hardware_peak_is_cores_lanes_fma_units_two_and_the_clock",)),
    Bug("% of peak over the implementation's own GEMM again, not the run's one figure", "harness/suite/asv_results.py",
        'best = gemm.groupby(RUN_KEY + ["device"])["value"].max()',
        'best = gemm.groupby(RUN_KEY + ["device"])["value"].min()',
        ("tests/test_report.py::test_every_derived_figure_of_the_summary_is_the_one_computed_by_hand",)),
    Bug("torch-fused keeps the slowest convolution strategy", "implementations/torch/_conv_plans.py",
        "_, forward, weight, input_ = min(candidates)", "_, forward, weight, input_ = max(candidates)",
        ("tests/test_torch_fused.py::test_forward_and_weight_gradient_are_chosen_together",)),
    Bug("the spectral forward adds the imaginary cross term instead of subtracting it",
        "implementations/torch/_spectral.py",
        "imaginary.baddbmm_(xr, wi, alpha=-1)", "imaginary.baddbmm_(xr, wi)",
        ("tests/test_spectral_convolution.py::test_the_three_products_are_conv2d_and_its_autograd_in_float64",)),
    Bug("the spectral inverse counts each kept frequency once, not for its conjugate pair",
        "implementations/torch/_spectral.py",
        "scale = torch.tensor([c[2] for c in classes], dtype=torch.float64) / (n * n)",
        "scale = torch.ones(len(classes), dtype=torch.float64) / (n * n)",
        ("tests/test_spectral_convolution.py::test_the_transform_is_the_dft_at_the_kept_frequencies_and_the_inverse_undoes_it",)),
    Bug("the plan cache is keyed without the batch shape", "implementations/torch/fused.py",
        "plan_shape(config, batch_size), torch.get_num_threads())", "plan_shape(config, 0), torch.get_num_threads())",
        ("tests/test_torch_fused.py::test_the_plan_is_the_fastest_of_injected_timings_and_is_cached_for_a_second_model",)),
    Bug("scaling efficiency against the ranks, not the compute used", "harness/measure/scaling.py",
        'return run["world_size"] * (run["threads_per_rank"] if device == "cpu" else 1)', 'return run["world_size"]',
        ("tests/test_distributed.py::test_scaling_efficiency_by_hand",)),
    Bug("exposed all-reduce with the paired difference's sign flipped", "harness/measure/scaling.py",
        "statistics.median(with_sync - without for", "statistics.median(without - with_sync for",
        ("tests/test_distributed.py::test_the_exposed_all_reduce_is_the_median_paired_difference",)),
    Bug("scaling gives every rank all the CPU threads", "harness/scaling.py",
        "threads = max(1, total_threads // world_size) if device", "threads = total_threads if device",
        ("tests/test_distributed.py::test_each_world_size_gets_its_share_of_the_batch_and_threads",)),
    Bug("parity check compares training reconstructions under the inference mask", "harness/check.py",
        "lengths, reconstructions = impl.forward(batch, train=True)",
        "lengths, reconstructions = impl.forward(batch, train=False)",
        ("tests/test_check.py::test_each_reconstruction_mask_is_checked_on_its_own",)),
    Bug("parity check's timed step is the first, not the median", "harness/check.py",
        "return float(np.median(times))", "return float(times[0])",
        ("tests/test_check.py::test_the_timed_step_is_the_median_after_one_untimed_step",)),
    Bug("asv quartiles swapped", "harness/suite/asv_results.py",
        "q25s, q75s = fields.get(\"stats_q_25\") or [], fields.get(\"stats_q_75\") or []",
        "q75s, q25s = fields.get(\"stats_q_25\") or [], fields.get(\"stats_q_75\") or []",
        ("tests/test_report.py::test_tidy_rows_equal_the_numbers_in_the_file",)),
    Bug("comparison without the noise filter", "harness/reporting/tables.py",
        "        if ranges[0] <= ranges[3] and ranges[2] <= ranges[1]:\n            return \"\"",
        "        if False:\n            return \"\"", ("tests/test_tables.py",)),
    Bug("comparison flags every change", "harness/reporting/tables.py",
        "    if not (ratio > CHANGE_FACTOR or ratio < 1 / CHANGE_FACTOR):\n        return \"\"",
        "    if ratio == 1:\n        return \"\"", ("tests/test_tables.py",)),
    Bug("comparison judges single samples", "harness/reporting/tables.py",
        "    if single_sample(old_n) or single_sample(new_n):", "    if False:", ("tests/test_tables.py",)),
    Bug("images per second from the wrong batch", "harness/reporting/tables.py",
        'frame["images_per_second"] = frame.index.get_level_values("batch_size").astype(float) / frame["train_step"]',
        'frame["images_per_second"] = 32 / frame["train_step"]',
        ("tests/test_report.py::test_every_derived_figure_of_the_summary_is_the_one_computed_by_hand",)),
    # the report's order of runs, parity marks and ranking
    Bug("runs ordered without git's ancestry (commit second, then hash)", "harness/suite/run_order.py",
        "    if a.commit != b.commit:\n        if ancestry", "    if False:\n        if ancestry",
        ("tests/test_run_order.py",)),
    Bug("runs ordered by commit date before when they were measured", "harness/suite/run_order.py",
        "((MEASURED, a.measured, b.measured), (COMMIT_DATE, a.date, b.date))",
        "((COMMIT_DATE, a.date, b.date), (MEASURED, a.measured, b.measured))", ("tests/test_run_order.py",)),
    Bug("every parity figure passes", "harness/reporting/ranking.py",
        "    return PASSED if math.isfinite(value) and value <= tolerance else FAILED", "    return PASSED",
        ("tests/test_ranking.py", "tests/test_report.py::test_an_implementation_that_failed_or_skipped_parity_is_"
         "marked_and_a_failed_one_never_ranked")),
    Bug("an implementation that FAILED parity is ranked", "harness/reporting/ranking.py",
        '    timed = timed[timed["parity"] != FAILED]\n', "", ("tests/test_ranking.py",)),
    Bug("neighbours ranked by their q25s, not the faster's q75 against the slower's q25",
        "harness/reporting/ranking.py",
        "return FASTER if quartiles[1] < quartiles[2] else OVERLAP",
        "return FASTER if quartiles[0] < quartiles[2] else OVERLAP", ("tests/test_ranking.py",)),
    Bug("a single sample on one side only does not stop a ranking", "harness/reporting/ranking.py",
        "if any(isinstance(n, (int, float)) and n == 1 for n in counts):",
        "if all(isinstance(n, (int, float)) and n == 1 for n in counts):", ("tests/test_ranking.py",)),
    Bug("the hardware peak is a parameter of every comparison row", "harness/suite/asv_results.py",
        '"profile", "config_name", "hardware_peak_gflops"]', '"profile", "config_name"]',
        ("tests/test_report.py::test_a_run_of_some_benchmarks_is_compared_on_them_alone_with_parameters_that_are_"
         "parameters",)),
    Bug("profile: autograd nodes not charged to their forward layer", "harness/profile.py",
        "layer = by_sequence.get(node.sequence_nr) if node.sequence_nr >= 0 else None", "layer = None",
        ("tests/test_profile.py::test_backward_nodes_are_charged_to_the_layer_of_their_forward_operation",)),
    Bug("profile: the update's FLOPs left out", "harness/measure/flops.py",
        "    table[(\"update\", OPTIMIZER)] = adam_flops(config)\n", "",
        ("tests/test_profile.py::test_per_layer_flops_add_up_to_the_phase_totals",)),
    # data and training
    Bug("shifts of at most 1 pixel on one side", "harness/data.py",
        "offsets = rng.integers(0, 2 * max_shift + 1, size=(2, count))",
        "offsets = rng.integers(0, 2 * max_shift, size=(2, count))",
        ("tests/test_data.py::test_shift_moves_each_image_by_at_most_two_pixels_and_covers_every_offset",)),
    Bug("augmentation applied when switched off", "harness/data.py",
        "yield (shift_images(images, rng) if augment else images)", "yield shift_images(images, rng)",
        ("tests/test_data.py::test_augmentation_shifts_real_images_and_is_absent_when_off",)),
    Bug("images out of step with their labels", "harness/data.py",
        "yield (shift_images(images, rng) if augment else images), dataset.labels[index]",
        "yield (shift_images(images, rng) if augment else images), dataset.labels[np.sort(index)]",
        ("tests/test_data.py::test_batches_cover_the_epoch_once_with_each_image_beside_its_label",)),
    Bug("label range check off by one", "harness/data.py", "    if labels.max(initial=0) > 9:",
        "    if labels.max(initial=0) > 10:", ("tests/test_data.py::test_a_split_that_is_not_mnist_is_named",)),
    Bug("image and label counts not compared", "harness/data.py", "    if len(images) != len(labels):",
        "    if len(images) < len(labels):", ("tests/test_data.py::test_a_split_that_is_not_mnist_is_named",)),
    Bug("images per split not checked", "harness/data.py", "    if len(images) != MNIST_COUNTS[split]:",
        "    if not len(images):", ("tests/test_data.py::test_a_split_that_is_not_mnist_is_named",)),
    Bug("an epoch's data drawn from the seed alone", "harness/training/loop.py",
        "    return np.random.default_rng([seed, epoch, rank])", "    return np.random.default_rng([seed, rank])",
        ("tests/test_data.py::test_the_training_epochs_draw_their_batches_from_seed_and_epoch",)),
    Bug("threads asked for are not pinned", "harness/training/loop.py", "    set_threads(count)\n    return count",
        "    return count", ("tests/test_train.py::test_every_thread_pool_is_pinned_to_the_count_asked_for",)),
    Bug("a new run replaces an existing results file", "harness/training/loop.py",
        "    if existing and not overwrite:", "    if False:",
        ("tests/test_train.py::test_a_new_run_onto_an_existing_results_file_is_refused_and_the_file_kept",)),
    Bug("a resume ignores an option that differs", "harness/training/loop.py",
        "        if key in given and getattr(args, key) != value:", "        if False:",
        ("tests/test_train.py::test_a_resume_refuses_an_option_that_differs_from_the_run",)),
    Bug("a diverged run ends as failed", "harness/training/run_status.py", "        return STOPPED",
        "        return FAILED",
        ("tests/test_run_status.py",)),
    Bug("SIGTERM ends a run as a failure", "harness/training/run_status.py",
        "class Terminated(KeyboardInterrupt):", "class Terminated(RuntimeError):",
        ("tests/test_train.py::test_sigterm_ends_the_run_as_ctrl_c_does_and_says_nothing_was_completed",)),
    Bug("profiled steps all after the unprofiled ones", "harness/profile.py",
        "        for profiled in ((False, True) if index % 2 == 0 else (True, False)):",
        "        for profiled in (False, True):",
        ("tests/test_profile.py::test_profiled_and_unprofiled_steps_are_interleaved_in_alternating_order",)),
    Bug("no closest name for a misspelling", "harness/registry.py",
        "        hint = f\" (did you mean {closest[0]}?)\" if closest else \"\"", "        hint = \"\"",
        ("tests/test_registry.py::test_unknown_name_lists_the_known_ones",)),
    Bug("a plugin's route runs outside the routing range", "implementations/torch/autograd.py",
        "        if type(self).route is TorchCapsNet.route:", "        if True:",
        ("tests/test_plugin.py::test_the_example_plugin_gets_its_routing_rows_in_a_profile_for_free",)),
    Bug("the distributed sampler never reshuffles", "harness/training/ddp.py", "        sampler.set_epoch(epoch - 1)",
        "        sampler.set_epoch(0)",
        ("tests/test_distributed.py::test_two_ranks_learn_what_one_process_learns_on_the_global_batch",)),
    # measurement machinery
    Bug("NVML reads the free memory", "harness/measure/memory.py",
        "return Reading(int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used),",
        "return Reading(int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).free),",
        ("tests/test_memory.py::test_nvml_opens_the_gpu_the_framework_uses_by_its_pci_bus_id",)),
    Bug("NVML takes any process's figure", "harness/measure/memory.py",
        "if entry.pid == self.pid and entry.usedGpuMemory is not None:", "if entry.usedGpuMemory is not None:",
        ("tests/test_memory.py",)),
    Bug("a refused NVML process list fails the device figure too", "harness/measure/memory.py",
        "        except Exception as error:  # NVMLError_NotSupported, NVMLError_NoPermission, ...",
        "        except ImportError as error:",
        ("tests/test_memory.py::test_a_refused_process_list_makes_the_process_figure_unknown_and_keeps_the_device_"
         "figure",)),
    Bug("the previous grid point's model stays alive", "harness/measure/step_memory.py",
        "        del impl, batch\n        gc.collect()", "        kept = impl  # noqa: F841",
        ("tests/test_step_memory.py::test_every_point_follows_one_rule_and_a_failing_point_is_skipped",)),
    Bug("a dead memory worker is waited for", "harness/measure/step_memory.py",
        "    sender.close()  # the child's copy", "    keep = sender  # the child's copy",
        ("tests/test_step_memory.py::test_a_worker_that_dies_is_a_failure_within_seconds",)),
    Bug("the GPU run packs its archive only at the end", "harness/gpu_benchmark.py",
        "        pack(plan, steps, stream)\n    print(", "    pack(plan, steps, stream)\n    print(",
        ("tests/test_gpu_benchmark.py::test_a_run_killed_mid_stage_leaves_the_archive_and_says_what_was_running",)),
    Bug("a failing GPU-run stage ends the run", "harness/gpu_benchmark.py",
        "            steps[stage.name] = outcome\n", "            steps[stage.name] = outcome\n"
        "            if outcome['status'] != 'ok':\n                break\n",
        ("tests/test_gpu_benchmark.py::test_a_failing_stage_is_recorded_with_its_last_line_and_the_run_goes_on",)),
    Bug("the CUDA-graph backward is captured lazily", "implementations/torch/cuda_graph.py",
        "        if region.backward is None:\n            self._capture_backward(region)\n        region.captured",
        "        region.captured",
        ("tests/test_torch_cuda_graph.py::test_a_train_step_capture_between_forward_loss_and_backward_breaks_"
         "nothing",)),
    Bug("the allocator's cache is not emptied before the measured step", "harness/measure/step_memory.py",
        "    impl.release_cached_memory()\n    impl.reset_peak_memory()", "    impl.reset_peak_memory()",
        ("tests/test_step_memory.py",)),
    Bug("the pool's live bytes never go down", "implementations/cupy/capsnet.py",
        "    def freed(self, size: int) -> None:\n        self.live -= size",
        "    def freed(self, size: int) -> None:\n        pass",
        ("tests/test_cupy_capsnet.py::test_peak_counter_follows_live_and_reserved_bytes",)),
    Bug("cgroup quota rounded down", "harness/threads.py", "return max(1, math.ceil(int(quota) / int(period)))",
        "return max(1, int(quota) // int(period))", ("tests/test_threads.py",)),
    Bug("the timed train step does not wait for the device", "benchmarks/bench_phases.py",
        '        """Forward, backward and one Adam update."""\n        self.impl.train_step(self.batch)\n'
        "        self.impl.synchronize()",
        '        """Forward, backward and one Adam update."""\n        self.impl.train_step(self.batch)',
        ("tests/test_suite_regions.py",)),
    Bug("the timed backward includes a forward pass", "benchmarks/bench_phases.py",
        "    def time_backward(self, *params):\n        self.impl.backward()",
        "    def time_backward(self, *params):\n        self.impl.forward_loss(self.batch)\n"
        "        self.impl.backward()",
        ("tests/test_suite_regions.py",)),
    # the asv suite's re-runs and plugins: a skip never erases a figure, an unknown name ends the run, a run
    # that cannot measure an installed plugin says so
    Bug("a failed cell keeps the earlier figure as a skipped one does", "harness/suite/asv_keep_figures.py",
        "if util.is_nan(new) and not util.is_na(old)", "if util.is_na(new) and not util.is_na(old)",
        ("tests/test_benchmarks.py::test_a_skip_keeps_the_earlier_figure_and_a_new_figure_or_a_failure_replaces_it",)),
    Bug("asv.conf.json does not load the plugin that keeps figures", "asv.conf.json",
        '"plugins": [".harness.suite.asv_keep_figures", ', '"plugins": [',
        ("tests/test_benchmarks.py::test_a_narrowed_or_misspelt_rerun_keeps_every_earlier_figure",)),
    Bug("the warning of unreachable plugins before a --python=same run too", "harness/suite/asv_plugin_reach.py",
        "    if not names or not builds_its_environments(conf, env_spec):", "    if not names:",
        ("tests/test_plugin.py::test_a_run_in_an_environment_asv_builds_names_the_plugins_it_cannot_measure",)),
    Bug("an unknown name in CAPSBENCH_IMPLEMENTATIONS is skipped, not the end of the run", "benchmarks/common.py",
        "    unknown = sorted(chosen - set(registry.names()))", "    unknown = []",
        ("tests/test_benchmarks.py::test_a_narrowed_or_misspelt_rerun_keeps_every_earlier_figure",
         "tests/test_benchmarks.py::test_implementations_can_be_narrowed_and_unknown_names_are_one_line")),
    # README's main job: host memory of one step, JAX in the quick profiles
    Bug("the host-memory figures build the model in setup again", "benchmarks/bench_memory.py",
        "        setup_benchmark(params[0])\n", "        super().setup(*params)\n",
        ("tests/test_suite_regions.py::test_host_memory_builds_a_model_only_for_the_step_it_samples",)),
    Bug("the host memory of a step samples the model's build too", "benchmarks/bench_memory.py",
        "        self.build(params)\n        with host_sampler(interval_s=0.001) as sampler:\n",
        "        with host_sampler(interval_s=0.001) as sampler:\n            self.build(params)\n",
        ("tests/test_suite_regions.py::test_host_memory_builds_a_model_only_for_the_step_it_samples",)),
    Bug("the host memory plot draws an empty panel for a figure the run did not measure", "harness/reporting/plots.py",
        'panels = [panel for panel in HOST_MEMORY_PANELS if panel[0] in set(rows["metric"])]',
        "panels = list(HOST_MEMORY_PANELS)",
        ("tests/test_plots.py::test_the_host_memory_plot_draws_only_the_figures_the_run_measured",)),
    Bug("the quick profiles leave JAX out again, its persistent compile cache ignored", "harness/suite/sizes.py",
        "if cls.first_call_compiles and not cls.compile_cache_persists and not profile[\"compiled\"]:",
        "if cls.first_call_compiles and not profile[\"compiled\"]:",
        ("tests/test_suite_profiles.py",)),
    Bug("a profile's left-outs for cost are never applied", "harness/suite/sizes.py",
        "    if name in profile.get(\"left_out\", {}):", "    if name in profile.get(\"leave_out\", {}):",
        ("tests/test_suite_profiles.py",)),
    # the routing gradient final (harness.spec)
    Bug("final lets the gradient through the early routing iterations (autograd)", "implementations/torch/routing.py",
        '    if gradient == "final" and iteration < iterations - 1:\n        return u_hat.detach()',
        '    if gradient == "final" and iteration < iterations - 1:\n        return u_hat',
        ("tests/test_contract.py::test_final_routing_gradient_of_the_hand_worked_two_by_two_case",)),
    Bug("final's hand-written backward takes the first iteration's couplings", "implementations/numpy/routing.py",
        "    coupling, s, _ = cache[-1]\n    with layer_range(f\"routing_iteration_{len(cache)}\", \"backward\"):\n"
        "        grad_s = squash_backward(xp, s, grad_v, eps)",
        "    coupling, s, _ = cache[0]\n    with layer_range(f\"routing_iteration_{len(cache)}\", \"backward\"):\n"
        "        grad_s = squash_backward(xp, s, grad_v, eps)",
        ("tests/test_contract.py::test_final_routing_gradient_of_the_hand_worked_two_by_two_case",)),
    Bug("torch-fused's final backward ignores the squash", "implementations/torch/routing.py",
        "            grad_s = squash_backward(s, grad_v, eps)\n            grad_u_hat = workspace.get(",
        "            grad_s = grad_v\n            grad_u_hat = workspace.get(",
        ("tests/test_torch_fused.py::test_final_routing_gradient_is_the_detached_autograd_routing",)),
    Bug("a plugin claiming final is not held to it", "harness/check.py",
        '    config = get_config(args.config).replace(routing_gradient=args.routing_gradient)',
        '    config = get_config(args.config)',
        ("tests/test_check.py::test_an_implementation_without_the_routing_gradient_is_skipped_with_the_reason",)),
    Bug("the saving of final is final / full", "harness/reporting/tables.py",
        '        frame[f"{phase}_saving"] = 1.0 - frame[f"{phase}_final"] / frame[f"{phase}_full"]',
        '        frame[f"{phase}_saving"] = frame[f"{phase}_final"] / frame[f"{phase}_full"]',
        ("tests/test_tables.py::test_routing_gradient_saving_and_routing_shares_by_hand",)),
    Bug("a resumed run forgets its routing gradient", "harness/training/loop.py",
        '             "routing_gradient": record.get("routing_gradient", "full")}',
        '             "routing_gradient": "full"}',
        ("tests/test_train.py::test_a_final_routing_gradient_run_records_it_and_resumes_with_it",)),
    Bug("set-up: torch-fused's plan measured in the first step, not before it", "harness/training/loop.py",
        "    use_plan_for(batch_size)\n", "",
        ("tests/test_train.py::test_the_convolution_plan_is_set_up_before_the_first_step_and_kept_out_of_every_time",)),
    Bug("set-up: a last partial batch measures a plan of its own", "implementations/torch/fused.py",
        "            serving = serving_batch_size(batch_size, self.plans)", "            serving = None",
        ("tests/test_torch_fused.py::test_a_smaller_batch_takes_the_plan_of_a_larger_one_planned_before",
         "tests/test_train.py::test_the_convolution_plan_is_set_up_before_the_first_step_and_kept_out_of_every_time")),
    Bug("resume: the run's MNIST folder is not read again", "harness/training/loop.py",
        "    if args.data_dir is None and recorded and Path(recorded).is_dir():", "    if False:",
        ("tests/test_train.py::test_an_interrupted_run_resumes_with_its_file_alone",)),
    Bug("resume: --impl OTHER continues on the run's implementation", "harness/training/loop.py",
        '    if "impl" not in given or args.impl is None:', "    if True:",
        ("tests/test_train.py::test_a_run_resumed_on_another_implementation_learns_as_the_uninterrupted_one_and_"
         "says_which_ran_what",)),
    Bug("resume: on another implementation without Adam's state", "harness/train.py",
        "        if adam is not None:\n            impl.load_adam_state(adam)",
        "        if adam is not None and info.name == loop.ran_on(record):\n            impl.load_adam_state(adam)",
        ("tests/test_train.py::test_a_run_resumed_on_another_implementation_learns_as_the_uninterrupted_one_and_"
         "says_which_ran_what",)),
    Bug("an unwritable results folder found only at the first write", "harness/train.py",
        "        loop.writable_output(out)\n", "",
        ("tests/test_train.py::test_an_output_that_cannot_be_written_is_one_line_before_any_training",)),
    Bug("keep finds an unwritable --to only when it copies", "harness/keep.py",
        "        writable_folder(args.target)\n", "        pass\n",
        ("tests/test_outputs.py",)),
    Bug("an output under a file reported without the file in its way", "harness/results.py",
        "if path.exists() and not path.is_dir()), None)", "if False), None)",
        ("tests/test_outputs.py",)),
    Bug("figures: no progress while classifying", "harness/figures.py",
        "        chunks.append(impl.to_numpy(lengths).argmax(axis=1))\n        progress.update()\n",
        "        chunks.append(impl.to_numpy(lengths).argmax(axis=1))\n",
        ("tests/test_figures.py::test_a_long_run_in_a_pipe_says_how_far_it_is",)),


    # routing that the check's routing case (harness.check.ROUTING_SCALE) sees in float32 on the small network
    Bug("numpy routing never updates its logits", "implementations/numpy/routing.py",
        "                logits = logits + xp.matmul(u_hat, v[:, :, :, None])[..., 0]  # b_ij +=",
        "                logits + xp.matmul(u_hat, v[:, :, :, None])[..., 0]  # b_ij +=",
        (f"{FLOAT32_PARITY}[numpy-vectorised-float32]",)),
    Bug("numpy routing runs one iteration too many", "implementations/numpy/routing.py",
        "    batch, n_out, n_in, _ = u_hat.shape\n    logits = xp.zeros((batch, n_out, n_in), dtype=u_hat.dtype)",
        "    batch, n_out, n_in, _ = u_hat.shape\n    iterations += 1\n"
        "    logits = xp.zeros((batch, n_out, n_in), dtype=u_hat.dtype)",
        (f"{FLOAT32_PARITY}[numpy-vectorised-float32]",)),
    Bug("numpy's network routes one iteration too few", "implementations/numpy/capsnet.py",
        "self.routing_functions.forward(xp, u_hat, config.routing_iterations,",
        "self.routing_functions.forward(xp, u_hat, config.routing_iterations - 1,",
        (f"{FLOAT32_PARITY}[numpy-vectorised-float32]",)),
    Bug("numpy looped routing updates the logits after the last iteration too", "implementations/numpy/routing.py",
        "            if iteration < iterations - 1:\n                for j in range(n_out):",
        "            if iteration < iterations:\n                for j in range(n_out):",
        (f"{FLOAT32_PARITY}[numpy-looped-float32]",)),
    Bug("torch-fused's routing never updates its logits", "implementations/torch/routing.py",
        "logits = agreed if logits is None else logits.add_(agreed)", "logits = torch.zeros_like(agreed)",
        (f"{FLOAT32_PARITY}[torch-fused-float32]",)),
    Bug("torch-fused's routing normalises the couplings over the input capsules", "implementations/torch/routing.py",
        "1.0 / n_out)\n            else:\n                coupling = torch.softmax(logits, dim=1)",
        "1.0 / n_out)\n            else:\n                coupling = torch.softmax(logits, dim=2)",
        (f"{FLOAT32_PARITY}[torch-fused-float32]",)),
    Bug("torch-fused's network routes one iteration too many", "implementations/torch/routing.py",
        "return config.routing_iterations, config.squash_eps",
        "return config.routing_iterations + 1, config.squash_eps",
        (f"{FLOAT32_PARITY}[torch-fused-float32]",)),
    Bug("torch-fused's network routes one iteration too few", "implementations/torch/routing.py",
        "return config.routing_iterations, config.squash_eps",
        "return config.routing_iterations - 1, config.squash_eps",
        (f"{FLOAT32_PARITY}[torch-fused-float32]",)),
    Bug("torch self-attention reference normalises the couplings over the input capsules",
        "implementations/torch/routing.py",
        "coupling = torch.softmax(logits, dim=1) + bias", "coupling = torch.softmax(logits, dim=2) + bias",
        ("tests/test_torch_capsnet.py::test_self_attention_softmax_is_over_the_outputs_and_the_bias_comes_after_it",)),
    Bug("torch looped self-attention drops the bias", "implementations/torch/routing.py",
        "coupling = exps[j] / total_exp + bias[j]", "coupling = exps[j] / total_exp",
        ("tests/test_torch_capsnet.py::test_self_attention_hand_computed",)),
    Bug("torch-fused's self-attention normalises the couplings over the input capsules",
        "implementations/torch/routing.py",
        "p = torch.softmax(logits, dim=1)", "p = torch.softmax(logits, dim=2)",
        ("tests/test_torch_fused.py::test_self_attention_routing_is_the_autograd_reference",)),
    Bug("torch-fused's self-attention adds the bias before the softmax", "implementations/torch/routing.py",
        "p = torch.softmax(logits, dim=1)", "p = torch.softmax(logits + bias, dim=1) - bias",
        ("tests/test_torch_fused.py::test_self_attention_routing_is_the_autograd_reference",)),
    Bug("torch-fused's self-attention gradient drops the path through T_j", "implementations/torch/routing.py",
        "torch.mul(weighted_sum(grad_logits, u_hat), dim ** -0.5, out=right[:, :, 2])", "right[:, :, 2].zero_()",
        ("tests/test_torch_fused.py::test_self_attention_routing_backward_finite_differences",)),
    Bug("torch-fused's self-attention bias gradient averaged over the batch", "implementations/torch/routing.py",
        "grad_bias = grad_coupling.sum(dim=0)", "grad_bias = grad_coupling.mean(dim=0)",
        ("tests/test_torch_fused.py::test_torch_fused_self_attention_network_is_torch_vectorised",)),
    Bug("torch looped routing updates the logits after the last iteration too", "implementations/torch/routing.py",
        "            if iteration < iterations - 1:\n                for j in range(n_out):",
        "            if iteration < iterations:\n                for j in range(n_out):",
        (f"{FLOAT32_PARITY}[torch-looped-float32]",)),

    # the gates: reported accuracy, bookkeeping, options, tolerances
    Bug("test accuracy over the number of training images", "harness/train.py",
        "correct / len(test_set)", "correct / len(train_set)",
        ("tests/test_gates.py::test_the_reported_accuracy_and_bookkeeping_are_the_hand_counted_ones",)),
    Bug("evaluation leaves out the last partial batch", "harness/training/loop.py",
        "    for start in range(0, len(labels), batch_size):",
        "    for start in range(0, len(labels) - batch_size + 1, batch_size):",
        ("tests/test_gates.py::test_the_reported_accuracy_and_bookkeeping_are_the_hand_counted_ones",)),
    Bug("sharded evaluation without the all-reduce of the counts", "harness/training/ddp.py",
        "    dist.all_reduce(total)\n", "",
        ("tests/test_gates.py::test_the_data_parallel_accuracy_is_the_hand_counted_fraction_of_the_whole_test_set",)),
    Bug("sharded evaluation over one rank's share of the test set", "harness/training/ddp.py",
        "return int(total.item()) / len(test_set)", "return int(total.item()) / len(labels)",
        ("tests/test_gates.py::test_the_data_parallel_accuracy_is_the_hand_counted_fraction_of_the_whole_test_set",)),
    Bug("the best accuracy is the last epoch's", "harness/training/loop.py",
        'record["best_test_accuracy"] = max(accuracies)', 'record["best_test_accuracy"] = accuracies[-1]',
        ("tests/test_gates.py::test_the_reported_accuracy_and_bookkeeping_are_the_hand_counted_ones",)),
    Bug("the mean loss is the last step's", "harness/training/loop.py",
        '"mean_loss": float(np.mean(losses)),', '"mean_loss": float(losses[-1]),',
        ("tests/test_gates.py::test_the_reported_accuracy_and_bookkeeping_are_the_hand_counted_ones",)),
    Bug("a resumed run restarts the clock of the loss curves", "harness/train.py",
        'elapsed = record["epochs"][-1]["elapsed_seconds"] if record["epochs"] else 0.0', "elapsed = 0.0",
        ("tests/test_gates.py::test_a_resumed_run_records_what_an_uninterrupted_one_does",)),
    Bug("--no-augment does not reach the batches", "harness/train.py",
        "args.seed, epoch, not args.no_augment)", "args.seed, epoch, True)",
        ("tests/test_gates.py::test_limit_batch_size_seed_and_no_augment_reach_the_batches_training_uses",)),
    Bug("--seed does not reach the batches", "harness/train.py",
        "loop.training_batches(train_set, args.batch_size, args.seed, epoch,",
        "loop.training_batches(train_set, args.batch_size, 0, epoch,",
        ("tests/test_gates.py::test_limit_batch_size_seed_and_no_augment_reach_the_batches_training_uses",)),
    Bug("the float32 gradient tolerance loosened tenfold", "harness/tolerances.py",
        '"float32": {"output": 2e-5, "gradient": 1e-3,', '"float32": {"output": 2e-5, "gradient": 1e-2,',
        ("tests/test_check.py::test_every_tolerance_is_tight_from_both_sides",)),
    Bug("the float64 parameter tolerance loosened tenfold", "harness/tolerances.py",
        '"gradient": 1e-9, "parameter": 1e-8}', '"gradient": 1e-9, "parameter": 1e-7}',
        ("tests/test_check.py::test_every_tolerance_is_tight_from_both_sides",)),
    Bug("routing gradients judged as outputs", "harness/check.py",
        'if quantity.startswith(("grad ", "routing grad")):', 'if quantity.startswith("grad "):',
        ("tests/test_check.py::test_every_tolerance_is_tight_from_both_sides",)),
    Bug("the check ignores --batch-size", "harness/check.py",
        "rows.extend(check_implementation(info.name, config, dtype, args.batch_size))",
        "rows.extend(check_implementation(info.name, config, dtype))",
        ("tests/test_check.py::test_the_options_reach_what_the_check_runs",)),
    Bug("the parity gate exits 0 on a disagreement", "harness/check.py", "    if failures or crashed:",
        "    if crashed:", ("tests/test_check.py::test_the_command_exits_1_on_a_planted_disagreement",)),
    # plots and the report as a reader meets them
    Bug("the accuracy axis starts a quarter point under its lowest epoch", "harness/reporting/plots.py",
        "margin = max(0.25, ACCURACY_MARGIN * (100 - lowest))", "margin = 0.25",
        ("tests/test_plots.py::test_a_single_accuracy_point_lies_inside_its_axis_not_on_an_edge",)),
    Bug("a y label taller than its panel is left whole", "harness/reporting/plots.py",
        "            label.set_text(broken(text, lines))", "            label.set_text(text)",
        ("tests/test_plots.py::test_no_y_label_is_taller_than_its_axes_so_none_reaches_a_title",)),
    Bug("a y label breaks after a comma as readily as before a parenthesis", "harness/reporting/plots.py",
        "COMMA_BREAK_COST = 6 ", "COMMA_BREAK_COST = 0 ",
        ("tests/test_plots.py::test_no_y_label_is_taller_than_its_axes_so_none_reaches_a_title",)),
    Bug("a long legend shortens the panels instead of growing the figure", "harness/reporting/plots.py",
        "    height += max(0.0, bottom - BOTTOM_ALLOWANCE)", "    height += 0.0",
        ("tests/test_plots.py::test_training_curves_keep_their_panels_tall_and_the_legend_clear_of_them",)),
    Bug("the legend keeps every column asked for, however wide", "harness/reporting/plots.py",
        "if wide.get_window_extent(renderer).width <= fig.bbox.width:", "if True:",
        ("tests/test_plots.py::test_a_legend_of_long_names_takes_fewer_columns_instead_of_running_off_the_figure",)),
    Bug("the training tables skip a heading level", "harness/reporting/sections.py",
        'f"### {int(train_images):,} training images', 'f"#### {int(train_images):,} training images',
        ("tests/test_report_as_read.py::test_the_shipped_report_steps_down_one_heading_level_at_a_time",)),
    Bug("a report write that fails midway ends in a traceback", "harness/report.py",
        "        if not writing_failed(error, out):\n            raise\n", "        raise\n",
        ("tests/test_report_as_read.py::test_a_write_that_fails_midway_is_one_line_and_keeps_the_earlier_report",)),
    # figures of a checkpoint
    Bug("the perturbation grid stops one step short", "harness/figures.py",
        "np.arange(-steps, steps + 1) * PERTURBATION_STEP", "np.arange(-steps, steps) * PERTURBATION_STEP",
        ("tests/test_figures.py::test_the_perturbation_grid_is_the_papers",)),
    Bug("a perturbation tweaks that dimension of every class's capsule", "harness/figures.py",
        "tweaked[d * len(grid) : (d + 1) * len(grid), predicted, d] += grid",
        "tweaked[d * len(grid) : (d + 1) * len(grid), :, d] += grid[:, None]",
        ("tests/test_figures.py::test_a_perturbed_capsule_changes_one_dimension_of_the_predicted_class_only",)),
    Bug("the confusion matrix transposed", "harness/figures.py",
        "np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)",
        "np.add.at(counts, (np.asarray(predictions), np.asarray(labels)), 1)",
        ("tests/test_figures.py::test_the_confusion_matrix_counts_labels_in_rows_and_predictions_in_columns",)),
    Bug("the decoder mask keeps every class's capsule", "harness/decoder.py",
        "    return capsules * keep[:, :, None]", "    return capsules",
        ("tests/test_decoder.py::test_the_mask_keeps_only_the_chosen_class_capsule",)),
    Bug("the most frequent confusion counts the correct predictions", "harness/reporting/tables.py",
        "if predicted != true_class and count]", "if count]",
        ("tests/test_tables.py::test_per_class_table_by_hand",)),


    Bug("jax float64 runs with x64 off (computed in float32)", "implementations/jax/capsnet.py",
        "return jax.enable_x64(self._dtype == np.float64)", "return jax.enable_x64(False)",
        ("tests/test_jax_capsnet.py::test_float64_is_computed_in_float64_and_the_process_flag_stays_off",)),
    Bug("jax preallocation switched off only after jax is imported", "implementations/jax/_setup.py",
        "\nconfigure_environment()\n\ntry:\n    import jax\n", "\ntry:\n    import jax\n    configure_environment()\n",
        ("tests/test_jax_capsnet.py::test_preallocation_is_off_when_jax_is_first_imported",)),
    Bug("jax final routing gradient leaks through the early iterations", "implementations/jax/routing.py",
        "    agreeing = lax.stop_gradient(u_hat) if gradient == \"final\" else u_hat\n"
        "    logits = jnp.zeros((batch, n_in, n_out)",
        "    agreeing = u_hat\n    logits = jnp.zeros((batch, n_in, n_out)",
        ("tests/test_jax_capsnet.py::test_final_routing_gradient_reaches_u_hat_through_the_last_weighted_sum_only",)),
    Bug("the registry's temporary entry outlives its block", "harness/registry.py",
        "        _REGISTRY.entries.pop(name, None)", "        pass",
        ("tests/test_registry.py::test_registered_refuses_a_taken_name_and_restores_the_registry",)),
)


def scratch_copy(target: Path) -> Path:
    """The repository's tracked and untracked-but-not-ignored files, copied into ``target``."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO_ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def apply(bug: Bug, root: Path) -> None:
    path = root / bug.path
    text = path.read_text(encoding="utf-8")
    count = text.count(bug.old)
    if count != 1:
        raise ValueError(f"{bug.name}: the text to replace occurs {count} times in {bug.path}, not once")
    path.write_text(text.replace(bug.old, bug.new), encoding="utf-8")


def caught(bug: Bug) -> tuple[bool, float]:
    """(whether the tests failed with the bug in place, seconds)."""
    with tempfile.TemporaryDirectory(prefix="capsbench-planted-") as folder:
        root = scratch_copy(Path(folder))
        apply(bug, root)
        start = time.perf_counter()
        completed = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *bug.tests],
                                   cwd=root, capture_output=True, text=True,
                                   env={**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"})
        return completed.returncode == 1, time.perf_counter() - start  # 1: tests failed (not a collection error)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/planted_bugs.py", description=__doc__.split("\n")[0])
    parser.add_argument("pattern", nargs="?", default="", help="only bugs whose name contains this (default: all)")
    parser.add_argument("--list", action="store_true", help="list the bugs without running them (default: run)")
    args = parser.parse_args(argv)
    bugs = [bug for bug in BUGS if args.pattern in bug.name]
    if args.list:
        for bug in bugs:
            print(f"{bug.name}  [{bug.path}; {', '.join(bug.tests)}]")
        return 0
    missed = []
    for number, bug in enumerate(bugs, start=1):
        found, seconds = caught(bug)
        print(f"{number:2d}/{len(bugs)} {'caught' if found else 'MISSED'}  {bug.name} ({seconds:.0f} s)", flush=True)
        if not found:
            missed.append(bug.name)
    print(f"{len(bugs) - len(missed)} of {len(bugs)} planted bugs caught" + (f"; missed: {'; '.join(missed)}" if missed
                                                                             else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
