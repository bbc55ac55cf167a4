"""The profile's kernel-class table: names sorted into classes, the GPU's busy time as a union of intervals, its
longest idle stretches, and benchmarks/profile_classes.py reading the same off a chrome trace."""

from pathlib import Path

import pytest

from megatron_mmpl.training.step_profile import busy_time, idle_gaps, kernel_class, summarize_kernels

pytestmark = pytest.mark.unit


def test_kernel_names_fall_into_their_classes():
    names = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1": "attention",
        "triton_tem_fused_flex_attention_0": "attention",
        "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT": "gemm",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1": "gemm",
        "cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_nn_align2": "gemm",
        "void multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<float>>": "optimizer",
        "triton_poi_fused_add_cat_mul_neg_slice_0": "triton (compiled)",
        "qkv_rope_grad_kernel": "ours (Triton)",
        "swiglu_bwd_kernel": "ours (Triton)",
        "window_attention_kernel": "ours (Triton)",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float>": "norm",
        "Memcpy HtoD (Pinned -> Device)": "copy / cat / gather",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<OpaqueType<2u>>": "copy / cat / gather",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>": "reduction",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "elementwise",
        "some_custom_kernel": "other",
    }
    assert {n: kernel_class(n) for n in names} == names


def test_busy_time_counts_overlaps_once():
    assert busy_time([]) == 0.0
    assert busy_time([(0, 10), (5, 15), (20, 30), (22, 25)]) == 25.0
    assert busy_time([(20, 30), (0, 10)]) == 20.0


def test_summary_shares_and_idle():
    text = summarize_kernels([("nvjet_a", 0.0, 600.0), ("vectorized_elementwise_kernel", 600.0, 800.0),
                              ("cudnn_sdpa_flash", 900.0, 1000.0)], steps=1)
    assert "| gemm | 66.7% | 0.6 |" in text and "| elementwise | 22.2% | 0.2 |" in text
    assert "| attention | 11.1% | 0.1 |" in text
    assert "GPU busy 0.9 ms of 1.0 ms per step (90.0%); idle (host work, syncs, launch gaps) 10.0%" in text


def test_idle_gaps_longest_first_with_their_neighbours_and_host_call():
    kernels = [("a", 0.0, 10.0), ("b", 5.0, 20.0), ("c", 50.0, 60.0), ("d", 62.0, 70.0), ("e", 170.0, 171.0)]
    host = [("cudaLaunchKernel", 20.0, 22.0), ("cudaStreamSynchronize", 71.0, 169.0), ("cudaMemcpyAsync", 25.0, 40.0)]
    assert idle_gaps(kernels, host, count=2) == [(100.0, "d", "e", "cudaStreamSynchronize"),
                                                (30.0, "b", "c", "cudaMemcpyAsync")]
    assert idle_gaps(kernels, count=5)[-1] == (2.0, "c", "d", "")  # no host events: no name
    assert idle_gaps([("a", 0.0, 10.0), ("b", 2.0, 8.0)]) == []  # overlapping kernels leave no gap


def test_profile_classes_reads_a_chrome_trace(tmp_path, capsys):
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).parents[3] / "benchmarks"))
    import profile_classes

    events = [{"ph": "X", "cat": "kernel", "name": "nvjet_x", "ts": 0, "dur": 600},
              {"ph": "X", "cat": "kernel", "name": "vectorized_elementwise_kernel", "ts": 900, "dur": 100},
              {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 610, "dur": 280},
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1000}]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    profile_classes.main([str(path), "--gaps", "3"])
    out = capsys.readouterr().out
    assert "| gemm | 85.7% | 0.6 |" in out and "GPU busy 0.7 ms of 1.0 ms per step (70.0%)" in out
    assert "| 300 | nvjet_x | vectorized_elementwise_kernel | cudaStreamSynchronize |" in out


def test_profiler_writes_the_trace_and_the_kernel_table(tmp_path):
    import torch

    from megatron_mmpl.training.step_profile import start_profiler, stop_profiler

    prof = start_profiler(str(tmp_path))
    torch.ones(64, 64) @ torch.ones(64, 64)
    text = Path(stop_profiler(prof, str(tmp_path), steps=1)).read_text()
    assert (tmp_path / "profile" / "trace.json").is_file()
    assert "# torch.profiler over 1 step(s)" in text and "# longest GPU idle stretches" in text
    assert "aten::mm" in text  # the op table (CPU time here: no GPU kernels, so no classes and no gaps)
