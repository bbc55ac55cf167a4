"""The training loop, top to bottom: checks → process groups → model → optimizer → checkpoint → data → steps.

Runs under torchrun (RANK/WORLD_SIZE/... in the env) or as one process. Megatron does the work: the pipeline
schedule (1F1B over micro-batches), DDP with the distributed optimizer, dist checkpoints. On CPU the same
megatron code runs through compat/cpu_runtime.py (fp32, gloo).
"""

from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_mmpl.config import Config, ConfigError, dump_yaml, train_steps, validate_config, validate_layout
from megatron_mmpl.config.hf_config import check_matches_checkpoint, resolve_hf_config
from megatron_mmpl.errors import UserError
from megatron_mmpl.models.qwen25vl.spec import ModelSpec
from megatron_mmpl.parallel.process_groups import initialize_parallel, rank_position
from megatron_mmpl.plan.memory import checkpoint_bytes
from megatron_mmpl.storage.checkpoint_dir import check_free_space, clean_stale
from megatron_mmpl.storage.run_lock import RunLock
from megatron_mmpl.training import checkpoint as ckpt
from megatron_mmpl.training.batches import check_data_dir, check_mixture, open_batches
from megatron_mmpl.training.flops import FlopModel, Training, peak_tflops
from megatron_mmpl.training.forward_step import ForwardStep
from megatron_mmpl.training.logger import RunLogger
from megatron_mmpl.training.memory import plan_this_run, planned_vs_measured, use_expandable_segments
from megatron_mmpl.training.model_provider import build_model_chunk
from megatron_mmpl.training.optimizer import DTYPES, build_optimizer, current_lr, freeze, wrap_ddp
from megatron_mmpl.training.signals import StopSignal
from megatron_mmpl.training.step_profile import PhaseTimer, start_profiler, stop_profiler


@dataclass
class TrainResult:
    """What a run returns (tests compare these): per-step global loss, last step, why it stopped."""

    losses: dict[int, float] = field(default_factory=dict)
    step: int = 0
    stopped_by_signal: bool = False
    checkpoint: str | None = None
    model: object = None  # the bare model chunk (tests gather its weights)
    optimizer: object = None


def plan_start(cfg: Config) -> tuple[str, str | None]:
    """How the run starts, decided before any compute: ('resume', dir) | ('model', path) | ('fresh', None)."""
    if ckpt.latest_step(cfg.checkpoint_dir) is not None:
        return "resume", cfg.checkpoint_dir
    if cfg.checkpoint.load:
        kind = ckpt.classify_load_path(cfg.checkpoint.load)
        return kind, cfg.checkpoint.load
    return "fresh", None


def preflight(cfg: Config, world_size: int):
    """All checks that need no process group: config values, layout vs model shapes, inputs on disk.
    Returns the HF config, the model's spec (built once, here) and how the run starts."""
    validate_config(cfg)
    hf = resolve_hf_config(cfg.model)
    spec = ModelSpec.from_hf(hf)
    validate_layout(cfg, world_size, spec)
    if cfg.model.dtype != "fp32" and not torch.cuda.is_available():
        raise ConfigError(f"model.dtype={cfg.model.dtype} needs a GPU; on CPU set model.dtype=fp32")
    check_mixture(cfg.data, check_data_dir(cfg.data.shards, spec, cfg.data.storage_options), spec)
    start = plan_start(cfg)
    if start[0] == "model":
        check_matches_checkpoint(spec, cfg.model, start[1])
    return hf, spec, start


def train(cfg: Config, max_steps: int | None = None) -> TrainResult:
    """Run (or resume) the training job described by `cfg`; `max_steps` stops early (tests: N of 2N steps).
    Rank 0 locks run_dir (storage/run_lock.py); when that fails it raises at once and exits non-zero, and torchrun
    tears the other ranks down."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_mmpl.models.qwen25vl.build import load_model_weights

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    hf, spec, (start_kind, start_path) = preflight(cfg, world_size)
    run_lock = RunLock(cfg.run_dir).acquire() if int(os.environ.get("RANK", "0")) == 0 else None
    stale = []
    if run_lock is not None:  # under the lock: what an interrupted save left, then room for the next checkpoint
        stale = clean_stale(cfg.checkpoint_dir)
        check_free_space(cfg.checkpoint_dir, checkpoint_bytes(spec, cfg.model.dtype))
    use_expandable_segments()
    hf_side_dir = os.path.join(cfg.run_dir, "hf_files")  # HF config + tokenizer, copied into each checkpoint
    p, d = cfg.parallel, cfg.data
    layout = initialize_parallel(tp=p.tp, pp=p.pp, cp=p.cp, seed=cfg.seed, timeout_s=p.timeout_s)
    ckpt.start_writer_helper()  # now, so that a stop-save does not wait for its start
    memory_plan = plan_this_run(cfg, spec, world_size)  # resolves model.recompute=auto; refuses what cannot fit
    pos = rank_position()  # this rank's coordinates, passed to what needs them
    rank, dp, dp_rank = dist.get_rank(), pos.dp, pos.dp_rank
    num_microbatches = d.global_batch_size // (d.micro_batch_size * dp)
    total_steps = train_steps(cfg)
    config_yaml = dump_yaml(cfg)
    if rank == 0:
        dump_yaml(cfg, os.path.join(cfg.run_dir, "config.yaml"))
        tokenizer = check_data_dir(cfg.data.shards, storage_options=cfg.data.storage_options).get("tokenizer_name")
        side_source = start_path if start_kind == "model" else None
        if start_kind == "resume":
            side_source = ckpt.resolve_checkpoint(start_path)
        ckpt.write_hf_side_files(hf_side_dir, hf, side_source, tokenizer)

    # Model: this rank's chunk, frozen parts, weights of a converted checkpoint, DDP + distributed optimizer.
    module = build_model_chunk(cfg, spec, layout)
    freeze(module, cfg)
    if start_kind == "model":
        load_model_weights(start_path, module)
    model = wrap_ddp(module, cfg)
    optimizer, scheduler = build_optimizer(model, cfg)
    mcfg = module.config
    mcfg.finalize_model_grads_func = finalize_model_grads
    mcfg.no_sync_func = model.no_sync
    if cfg.model.dtype == "fp16":
        mcfg.grad_scale_func = optimizer.scale_loss

    # State: resume everything, or start at step 0.
    state, data_state = ckpt.TrainState(), None
    if start_kind == "resume":
        state, data_state = ckpt.resume(start_path, model, optimizer, scheduler, pos, cfg.checkpoint.on_corrupt,
                                        cfg.checkpoint.strict_resume)

    # Data: this data-parallel rank's packed micro-batches (TP/PP/CP peers read the same ones).
    seq_multiple = p.pad_multiple
    batches = open_batches(cfg, hf, dp_rank=dp_rank, dp_size=dp, state=data_state, pad_multiple=seq_multiple)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    flop_model = FlopModel(spec, Training.of(cfg.model, spec, p.pp, p.first_stage_layers))
    step_fn = ForwardStep(module, flop_model, device, DTYPES[cfg.model.dtype], pos.first_of_replica,
                          cp_rank=pos.cp_rank, cp_size=p.cp, seq_multiple=seq_multiple)
    forward_backward = get_forward_backward_func()
    loss_reporter = pos.last_stage and pos.tp_rank == 0

    log = RunLogger(cfg, writer=rank == 0, total_steps=total_steps, start_step=state.step)
    log.print(f"[mmpl train] {start_kind} at step {state.step}/{total_steps}: world {world_size} = "
              f"tp {p.tp} x pp {p.pp} x cp {p.cp} x dp {dp}; {num_microbatches} micro-batches of {d.micro_batch_size}")
    if memory_plan is not None:
        log.print(f"[mmpl train] memory plan: {memory_plan.peak.total / 2**30:.1f} GiB per GPU at peak (stage "
                  f"{memory_plan.peak.stage}) of {memory_plan.hardware.budget_bytes / 2**30:.1f} usable; LM "
                  f"recompute {memory_plan.recompute}, ViT recompute {memory_plan.vit_recompute}")
    if stale:
        log.print(f"[mmpl train] removed what interrupted saves left in {cfg.checkpoint_dir}: {', '.join(stale)}")
    memory_step = state.step + 2  # the optimizer's state exists from the first step on: its peak shows in the second
    signals = StopSignal()
    result = TrainResult(step=state.step, model=module, optimizer=optimizer)
    peak = peak_tflops(cfg.logging.peak_tflops)
    window = _Window()
    end = total_steps if max_steps is None else min(total_steps, max_steps)
    timer = PhaseTimer(module) if cfg.logging.phase_times and torch.cuda.is_available() else None
    prof_first, prof_last = cfg.logging.profile_steps or (0, -1)
    prof = None
    bad_in_row = bad_total = 0
    skipped = (0.0, 0.0)  # samples skipped by the loader since the run began: over-long, undecodable
    save_due = False
    try:
        while state.step < end:
            if state.step + 1 == prof_first:
                prof = start_profiler(cfg.run_dir)
            if timer is not None:
                timer.reset()
            t0 = time.perf_counter()
            step_fn.stats.reset()
            model.zero_grad_buffer()
            optimizer.zero_grad()
            reports = forward_backward(
                forward_step_func=step_fn, data_iterator=batches, model=model, num_microbatches=num_microbatches,
                seq_length=d.max_seq_len, micro_batch_size=d.micro_batch_size, forward_only=False,
            )
            lr = current_lr(optimizer)  # the rate this step applies

            # Two small all-reduces, before the optimizer steps: SUM of loss Σ/count (last stage, TP rank 0), tokens,
            # FLOPs and the loader's skip counts (first rank of each replica); MAX of data wait, peak memory and
            # "this rank's gradients are not finite".
            loss_pair = torch.stack([r["lm loss"] for r in reports]).sum(0).cpu() if loss_reporter and reports \
                else torch.zeros(2)
            s = step_fn.stats
            skips = _loader_skips(batches) if pos.first_of_replica else [0.0, 0.0]
            totals = torch.cat([loss_pair.double().cpu(), torch.tensor(
                [s.tokens, s.lm_flops, s.vit_flops, *skips, s.rebuilt_flops], dtype=torch.float64)])
            waits = torch.tensor([s.data_wait, _max_memory_gib(), 0.0 if _all_finite(model, "grad") else 1.0],
                                 dtype=torch.float64)
            _all_reduce(totals, dist.ReduceOp.SUM)
            _all_reduce(waits, dist.ReduceOp.MAX)
            loss = (totals[0] / totals[1].clamp_min(1)).item()
            finite = math.isfinite(loss) and waits[2].item() == 0
            if timer is not None:
                timer.mark("opt0")
            grad_norm, stepped = float("nan"), finite
            if finite:  # a non-finite step is skipped: no update, the scheduler does not advance
                ok, grad_norm, _ = optimizer.step()
                if ok:
                    scheduler.step(1)
                finite = grad_norm is None or math.isfinite(grad_norm)
            if timer is not None:
                timer.mark("opt1")
            state.step += 1
            state.consumed_samples += d.global_batch_size
            state.consumed_tokens += int(totals[2])
            skipped = (totals[5].item(), totals[6].item())
            bad_in_row = 0 if finite else bad_in_row + 1
            bad_total += 0 if finite else 1
            result.losses[state.step] = loss
            result.step = state.step
            window.add(loss, grad_norm, totals[2].item(), totals[3].item(), totals[4].item(), waits[0].item(),
                       time.perf_counter() - t0, waits[1].item(), timer.seconds() if timer is not None else None,
                       bad=not finite, skipped=skipped, rebuilt_flops=totals[7].item())
            if not finite:
                what = "its gradients were clipped to zero" if stepped else "the optimizer step was skipped"
                log.print(f"[mmpl train] step {state.step}: non-finite loss or gradient (loss {loss}, grad norm "
                          f"{grad_norm}); {what} ({bad_in_row} in a row, "
                          f"optim.max_bad_steps={cfg.optim.max_bad_steps})")
            if prof is not None and state.step == prof_last:
                log.print(f"[mmpl train] profile of steps {prof_first}-{prof_last}: "
                          f"{stop_profiler(prof, cfg.run_dir, prof_last - prof_first + 1)}")
                prof = None
            log.advance(state.step, loss)
            if state.step == min(memory_step, end) and torch.cuda.is_available():
                log.print(f"[mmpl train] {planned_vs_measured(memory_plan, pos.pp_rank)}")
            if state.step % cfg.logging.interval == 0 or state.step == end:
                log.log(state.step, window.metrics(lr, world_size, peak))
                window = _Window()
            if bad_in_row >= cfg.optim.max_bad_steps:
                raise NonFiniteSteps(
                    f"{bad_in_row} steps in a row (to step {state.step}) had a non-finite loss or gradient "
                    f"(optim.max_bad_steps={cfg.optim.max_bad_steps}); stopped without saving, the newest "
                    f"checkpoint is {_newest(cfg)}; lower optim.lr, raise optim.warmup or check the data")

            stop = signals.agreed()
            save_due = save_due or state.step % cfg.checkpoint.interval == 0 or state.step == total_steps
            if (stop or save_due) and finite:  # never a checkpoint from a non-finite step: the next finite one
                if not _all_finite(model, "param"):
                    raise NonFiniteSteps(f"step {state.step}: the weights hold NaN/Inf; not saving them (the "
                                         f"newest checkpoint is {_newest(cfg)})")
                result.checkpoint = _save(cfg, model, optimizer, scheduler, state, config_yaml, batches,
                                          hf_side_dir, pos)
                save_due = False
            if stop:
                result.stopped_by_signal = True
                saved = f"saved step {state.step} to {result.checkpoint}" if finite else \
                    f"step {state.step} was non-finite, not saved (newest checkpoint: {_newest(cfg)})"
                log.print(f"[mmpl train] stop signal: {saved}; exiting")
                break
        if bad_total or sum(skipped):
            log.print(f"[mmpl train] skipped in this run: {bad_total} non-finite step(s); samples over "
                      f"data.max_seq_len {int(skipped[0])}, undecodable {int(skipped[1])} (since the run began)")
    except RuntimeError as e:  # gloo's wait on a rank that hangs or died; NCCL's watchdog aborts by itself
        reason = _collective_failure(e)
        if reason is None:
            raise
        raise CollectiveFailed(f"rank {rank}: {reason} (parallel.timeout_s={p.timeout_s:g}); the run stops, "
                               f"resume from the newest checkpoint ({_newest(cfg)}) once every rank is healthy"
                               ) from e
    finally:
        if timer is not None:
            timer.close()
        signals.restore()
        log.close()
        close = getattr(batches, "close", None)
        if close is not None:
            close()
        if run_lock is not None:
            run_lock.release()
    return result


def _save(cfg, model, optimizer, scheduler, state, config_yaml, batches, hf_side_dir, pos) -> str:
    data_state = batches.state_dict() if hasattr(batches, "state_dict") else None
    return ckpt.save_checkpoint(cfg.checkpoint_dir, model, optimizer, scheduler, state, config_yaml, data_state, pos,
                                keep_last=cfg.checkpoint.keep_last, hf_side_dir=hf_side_dir)


class NonFiniteSteps(UserError):
    """Too many steps in a row with a non-finite loss or gradient (or non-finite weights before a save)."""


class CollectiveFailed(UserError):
    """A collective waited on a rank that hung or died."""


def _all_finite(model, what: str) -> bool:
    """Whether this rank's gradients ('grad', megatron DDP's fp32 grad buffers) or weights ('param') are all
    finite: one float32 sum per buffer (NaN/Inf survive a sum), no copy of the buffer."""
    buffers = list(getattr(model, "buffers", [])) + list(getattr(model, "expert_parallel_buffers", []))
    tensors = [getattr(b, f"{what}_data", None) for b in buffers]
    if not buffers or any(t is None for t in tensors):  # no megatron buffers: the parameters themselves
        params = [p for p in model.parameters() if p.requires_grad or what == "param"]
        tensors = [p.main_grad if what == "grad" and hasattr(p, "main_grad") else (p.grad if what == "grad" else p)
                   for p in params]
    sums = [t.sum(dtype=torch.float32) for t in tensors if t is not None and t.numel()]
    return bool(torch.isfinite(torch.stack(sums)).all()) if sums else True


def _loader_skips(batches) -> list[float]:
    """[over-long, undecodable] samples this replica's loader skipped since the run began (its saved counters)."""
    stats = getattr(getattr(batches, "loader", None), "stats", None)
    got = stats() if stats is not None else {}
    return [float(got.get("skipped_long", 0)), float(got.get("corrupt", 0))]


def _newest(cfg) -> str:
    step = ckpt.latest_step(cfg.checkpoint_dir)
    return ckpt.iter_dir(cfg.checkpoint_dir, step) if step is not None else "none yet"


def _collective_failure(e: RuntimeError) -> str | None:
    """What a failed gloo/NCCL collective means, or None for another RuntimeError."""
    text = str(e)
    if "Timed out" in text or "timed out" in text or "Timeout" in text:
        return "a collective (all-reduce, barrier or pipeline send/recv) timed out waiting on another rank: one " \
               "rank is hung (stopped, deadlocked, GPU hang) or far slower; its log says which"
    if any(k in text for k in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")):
        return "another rank died mid-collective (its log has the cause: killed, out of memory, a crash)"
    return None


def _all_reduce(t: torch.Tensor, op) -> None:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    if dist.get_backend() == "nccl":
        buf = t.cuda()
        dist.all_reduce(buf, op=op)
        t.copy_(buf.cpu())
    else:
        dist.all_reduce(t, op=op)


class _Window:
    """Sums over the steps of one log interval."""

    def __init__(self):
        self.n, self.loss, self.grad, self.tokens, self.lm, self.vit, self.wait, self.time = 0, 0.0, 0.0, 0.0, \
            0.0, 0.0, 0.0, 0.0
        self.rebuilt = 0.0
        self.mem = 0.0
        self.bad, self.skipped = 0, (0.0, 0.0)
        self.phases: dict[str, float] = {}

    def add(self, loss, grad_norm, tokens, lm_flops, vit_flops, wait, seconds, mem_gib, phases=None, bad=False,
            skipped=(0.0, 0.0), rebuilt_flops=0.0):
        self.n += 1
        self.loss += loss  # NaN stays NaN in the log
        self.grad += float(grad_norm) if grad_norm is not None else 0.0
        self.bad += int(bad)
        self.skipped = skipped
        self.tokens += tokens
        self.lm += lm_flops
        self.vit += vit_flops
        self.rebuilt += rebuilt_flops
        self.wait += wait
        self.time += seconds
        self.mem = max(self.mem, mem_gib)
        for k, v in (phases or {}).items():
            self.phases[k] = self.phases.get(k, 0.0) + v

    def metrics(self, lr: float, world_size: int, peak: float | None) -> dict:
        t = max(self.time, 1e-9)
        tflops = self.lm / t / world_size / 1e12
        vit = self.vit / t / world_size / 1e12
        hardware = (self.lm + self.vit + self.rebuilt) / t / world_size / 1e12  # recompute counted
        return {
            "loss": self.loss / self.n, "lr": lr, "grad_norm": self.grad / self.n, "tokens_per_s": self.tokens / t,
            "tflops_per_gpu": tflops, "vit_tflops_per_gpu": vit,
            "mfu": tflops / peak if peak else None, "vit_mfu": vit / peak if peak else None,
            "hfu": hardware / peak if peak else None, "max_mem_gib": self.mem,
            "data_wait": self.wait / t, **{f"{k}_s": v / self.n for k, v in self.phases.items()},
            "step_s": t / self.n, "bad_steps": self.bad, "skipped_long": int(self.skipped[0]),
            "skipped_corrupt": int(self.skipped[1]),
        }


def _max_memory_gib() -> float:
    """Peak memory of this rank: CUDA allocations on GPU, the process' max RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
