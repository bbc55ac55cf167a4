"""Checkpoint conversion: HF → MCore → HF is bit-exact (tied and untied); the converted checkpoint loaded at
TP=2, PP=2 and TP=2×PP=2 gives transformers' logits within 1e-4 (fp32); transformers loads the export and
reproduces the original logits; bad inputs fail with one clear error and leave nothing behind."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_mmpl.parallel.spawn import run_distributed
from tests.child_env import child_env

pytestmark = pytest.mark.distributed
LOGIT_TOL = 1e-4


def _save_tiny(path, preset, seed):
    from megatron_mmpl.models.qwen25vl.testing import tiny_hf_model

    tiny_hf_model(preset, seed=seed).save_pretrained(path)


def _convert_roundtrip(hf_dir, mc_dir, back_dir, naming):
    from megatron_mmpl.conversion.export_hf import mcore_to_hf
    from megatron_mmpl.conversion.import_hf import hf_to_mcore

    hf_to_mcore(hf_dir, mc_dir, dtype="fp32", progress=False)
    mcore_to_hf(mc_dir, back_dir, tokenizer="none", naming=naming, progress=False)
    return json.loads(open(os.path.join(mc_dir, "mmpl", "conversion.json")).read())


def _tensors(d):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Tiny untied and tied HF checkpoints, converted to MCore and back (in one spawned rank each)."""
    root = tmp_path_factory.mktemp("conv")
    out = {}
    for preset, seed in (("tiny", 0), ("tiny-tied", 1)):
        d = {k: str(root / f"{preset}-{k}") for k in ("hf", "mc", "back")}
        _save_tiny(d["hf"], preset, seed)
        d["summary"] = run_distributed(_convert_roundtrip, 1, d["hf"], d["mc"], d["back"], None)[0]
        out[preset] = d
    return out


@pytest.mark.parametrize("preset", ["tiny", "tiny-tied"])
def test_roundtrip_is_bit_exact(converted, preset):
    d = converted[preset]
    a, b = _tensors(d["hf"]), _tensors(d["back"])
    assert set(a) == set(b), set(a) ^ set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    if preset == "tiny-tied":
        assert "lm_head.weight" not in b and json.load(open(os.path.join(d["back"], "config.json")))[
            "tie_word_embeddings"]
    assert d["summary"]["tensors"] > 0 and d["summary"]["naming"] == "original"


def test_export_loads_in_transformers_and_reproduces_logits(converted):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_mmpl.conversion.verify import PROMPT
    from megatron_mmpl.models.qwen25vl.testing import hf_logits, mm_prompt

    d = converted["tiny"]
    orig = Qwen2_5_VLForConditionalGeneration.from_pretrained(d["hf"], dtype=torch.float32).eval()
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(d["back"], dtype=torch.float32).eval()
    batch = mm_prompt(orig.config, PROMPT, seed=3)
    with torch.no_grad():
        assert torch.equal(hf_logits(orig, batch), hf_logits(back, batch))


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_converted_checkpoint_matches_transformers_at_tp_pp(converted, tp, pp):
    from megatron_mmpl.conversion.verify import verify

    r = verify(converted["tiny"]["hf"], converted["tiny"]["mc"], tp=tp, pp=pp)
    assert r["max_abs_logit_diff"] <= LOGIT_TOL, r
    assert r["argmax_agree"] == 1.0 and r["cosine"] > 0.999999, r


def _resave(mc_dir, out_dir, hf_dir, tp, pp):
    """One rank: load the converted checkpoint at (tp, pp) and save it again, as training does at that layout."""
    from megatron.core import dist_checkpointing
    from transformers import Qwen2_5_VLConfig

    from megatron_mmpl.conversion.hf_checkpoint import HFCheckpoint
    from megatron_mmpl.models.qwen25vl.build import build_model, load_model_weights
    from megatron_mmpl.parallel.process_groups import initialize_parallel

    layout = initialize_parallel(tp=tp, pp=pp)
    model = build_model(Qwen2_5_VLConfig(**HFCheckpoint(hf_dir).config_dict), layout, dtype=torch.float32,
                        overrides={"perform_initialization": False})
    load_model_weights(mc_dir, model)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, out_dir)


def _export(mc_dir, out_dir, hf_dir, dtype):
    from megatron_mmpl.conversion.export_hf import mcore_to_hf

    return mcore_to_hf(mc_dir, out_dir, hf_config_path=hf_dir, dtype=dtype, tokenizer="none", naming="original",
                       progress=False)


@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)])
def test_export_of_a_checkpoint_saved_at_tp_pp_is_bit_exact(converted, tmp_path, tp, pp):
    """mcore-to-hf reads any layout training saves: resaved at TP/PP, the export still equals the source HF
    tensors exactly (fp32), and a bf16 export equals the source cast to bf16."""
    d = converted["tiny"]
    resaved = tmp_path / "resaved"
    resaved.mkdir()
    run_distributed(_resave, tp * pp, d["mc"], str(resaved), d["hf"], tp, pp)
    writers = {os.path.basename(f).split("_")[2] for f in glob.glob(str(resaved / "__*_*.distcp"))}
    assert writers == {str(r) for r in range(tp * pp)}, writers  # every rank wrote its own part
    src = _tensors(d["hf"])
    for dtype, cast in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out = tmp_path / f"back-{dtype}"
        run_distributed(_export, 1, str(resaved), str(out), d["hf"], dtype)
        back = _tensors(out)
        assert set(back) == set(src), set(back) ^ set(src)
        bad = [k for k in src if back[k].dtype != cast or not torch.equal(back[k], src[k].to(cast))]
        assert bad == [], bad


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "megatron_mmpl.cli", "convert", *args], capture_output=True,
                          text=True, cwd=cwd, env=child_env(), timeout=300)  # CPU, as CI (tests/gpu: with a GPU)


def test_verify_cli_prints_the_summary_line_and_fails_above_tolerance(converted, tmp_path):
    d = converted["tiny-tied"]
    ok = _cli("verify", "--hf", d["hf"], "--ckpt", d["mc"])
    assert ok.returncode == 0, ok.stderr[-2000:]
    last = ok.stdout.strip().splitlines()[-1]
    assert last.startswith("max_abs_logit_diff=") and " cosine=" in last and " argmax_agree=" in last, last
    # same shapes, other weights: far above tolerance → exit 1
    _save_tiny(str(tmp_path / "other"), "tiny", seed=7)
    bad = _cli("verify", "--hf", str(tmp_path / "other"), "--ckpt", converted["tiny"]["mc"])
    assert bad.returncode == 1, bad.stdout[-500:] + bad.stderr[-1500:]


def test_bad_inputs_give_one_clear_error_and_leave_nothing(converted, tmp_path):
    src = converted["tiny"]["hf"]
    cases = []
    cases.append((["hf-to-mcore", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o1")], "not a directory"))
    # missing shard listed in the index
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for f in ("config.json",):
        (sharded / f).write_text(open(os.path.join(src, f)).read())
    names = list(_tensors(src))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}))
    cases.append((["hf-to-mcore", "--hf", str(sharded), "--out", str(tmp_path / "o2")], "missing"))
    # unknown architecture
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    cases.append((["hf-to-mcore", "--hf", str(other), "--out", str(tmp_path / "o3")], "unsupported architecture"))
    # mixed dtypes
    from safetensors.torch import save_file

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    t = _tensors(src)
    t[names[0]] = t[names[0]].to(torch.bfloat16)
    save_file(t, mixed / "model.safetensors")
    cases.append((["hf-to-mcore", "--hf", str(mixed), "--out", str(tmp_path / "o4")], "one floating dtype"))
    # a tensor missing from the checkpoint (checked before anything is written)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    t = _tensors(src)
    t.pop(names[-1])
    save_file(t, partial / "model.safetensors")
    cases.append((["hf-to-mcore", "--hf", str(partial), "--out", str(tmp_path / "o5")], "needed but missing"))
    cases.append((["hf-to-mcore", "--hf", src, "--out", converted["tiny"]["mc"]], "exists and is not empty"))
    cases.append((["mcore-to-hf", "--ckpt", str(tmp_path / "nothing"), "--out", str(tmp_path / "o6")],
                  "does not exist"))
    cases.append((["hf-to-mcore", "--hf", src, "--out", str(tmp_path / "o7"), "--dtype", "int8"], "--dtype"))
    # a checkpoint read as another model (shapes differ): refused during the export, nothing left behind
    cases.append((["mcore-to-hf", "--ckpt", converted["tiny"]["mc"], "--hf-config", "qwen25vl-3b", "--out",
                   str(tmp_path / "o8"), "--tokenizer", "none"], "holds another model"))
    for args, needle in cases:
        r = _cli(*args)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2, (args, r.stdout[-500:], r.stderr[-2000:])
        assert err and err[-1].startswith("mmpl convert: error:") and needle in err[-1], (args, err[-3:])
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(("o", ".o"))]
    assert leftovers == [], leftovers
