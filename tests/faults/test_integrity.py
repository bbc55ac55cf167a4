"""Damaged checkpoints, as a hostile tester leaves them: a corrupt or incomplete latest checkpoint of a real tiny
run is reported in one warning line and the run resumes from the older one with the losses of an uninterrupted
run (exact); on_corrupt=fail, strict_resume and an all-corrupt run dir stop with one error line (exit 2).

One spawned rank trains the base run once, then runs every case on its own copy of the run dir."""

import io
import logging
import os
import random
import shutil
from contextlib import redirect_stderr, redirect_stdout

import pytest

from megatron_mmpl.parallel.spawn import run_distributed
from megatron_mmpl.storage.integrity import MANIFEST
from tests.distributed.train_helpers import overrides

pytestmark = pytest.mark.integration

RECIPE = "examples/recipes/quickstart.yaml"
STEPS = 4  # checkpoints at steps 2 and 4 (checkpoint.interval=2, keep_last=0: both stay)
LATEST, OLDER = "iter_0000004", "iter_0000002"


def _flip(path: str, n: int = 64) -> None:
    """Invert `n` bytes in the middle of a file (its size stays)."""
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    open(path, "wb").write(bytes(data))


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def _garble(path: str) -> None:
    """Replace the whole file by random bytes of the same size."""
    size = os.path.getsize(path)
    open(path, "wb").write(random.Random(0).randbytes(size))


def _rng_file(ckpt: str) -> str:
    return os.path.join(ckpt, "mmpl", "rng_tp1pp1cp1dp1_r0.pt")


def _drop_manifests(ckpts: str) -> None:
    """Make every checkpoint look written before manifests existed."""
    for name in (LATEST, OLDER):
        os.remove(os.path.join(ckpts, name, MANIFEST))


def _damage(case: str, ckpts: str) -> None:
    latest = os.path.join(ckpts, LATEST)
    if case.startswith("old_"):
        _drop_manifests(ckpts)
    what = case.removeprefix("old_")
    if what in ("flip_distcp", "fail"):
        _flip(os.path.join(latest, "__0_0.distcp"))
    elif what == "truncate_distcp":
        _truncate(os.path.join(latest, "__0_1.distcp"))
    elif what == "delete_distcp":
        os.remove(os.path.join(latest, "__0_0.distcp"))
    elif what == "garble_metadata":
        _garble(os.path.join(latest, ".metadata"))
    elif what == "delete_common":
        os.remove(os.path.join(latest, "common.pt"))
    elif what == "garble_rng":
        _garble(_rng_file(latest))
    elif what == "garble_tokenizer":
        _garble(os.path.join(latest, "mmpl", "hf", "tokenizer.json"))
    elif what in ("no_state", "strict"):
        os.remove(_rng_file(latest))
        os.remove(os.path.join(latest, "mmpl", "data_dp0.pt"))
    elif what == "all_corrupt":
        for name in (LATEST, OLDER):
            _flip(os.path.join(ckpts, name, "__0_1.distcp"))
    else:
        raise AssertionError(case)


EXTRA = {"fail": ["checkpoint.on_corrupt=fail"], "old_strict": ["checkpoint.strict_resume=true"]}
FALLBACK = ["flip_distcp", "truncate_distcp", "delete_distcp", "garble_metadata", "delete_common", "garble_rng",
            "garble_tokenizer",
            "old_truncate_distcp", "old_garble_metadata", "old_delete_common", "old_garble_rng"]
CASES = [*FALLBACK, "fail", "old_no_state", "old_strict", "all_corrupt"]


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _losses(run: str) -> dict[int, float]:
    path = os.path.join(run, "losses.tsv")
    if not os.path.isfile(path):
        return {}
    rows = [ln.split("\t") for ln in open(path).read().splitlines() if ln.strip()]
    return {int(s): float(v) for s, v in rows}


def _main(tmp: str, run: str, *extra: str) -> dict:
    """`mmpl train` in this process; its exit code, stderr lines and megatron_mmpl warnings."""
    from megatron_mmpl.cli import main
    from megatron_mmpl.parallel.ports import free_port
    from megatron_mmpl.parallel.process_groups import destroy_parallel

    os.environ["MASTER_PORT"] = str(free_port())
    args = overrides(tmp, f"run_dir={run}", f"schedule.train_steps={STEPS}", "checkpoint.interval=2",
                     "checkpoint.keep_last=0", *extra)
    handler, err = _Lines(), io.StringIO()
    logging.getLogger("megatron_mmpl").addHandler(handler)
    try:
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            rc = main(["train", "--config", RECIPE, *args])
    finally:
        logging.getLogger("megatron_mmpl").removeHandler(handler)
        destroy_parallel()
    return {"rc": rc, "err": [ln for ln in err.getvalue().splitlines() if ln.strip()], "warnings": handler.lines,
            "losses": _losses(run)}


def run_cases(tmp: str, cases: list[str]) -> dict:
    """In a rank: the base run, then each case on a damaged copy of it."""
    base = os.path.join(tmp, "base")
    out = {"base": _main(tmp, base)}
    for case in cases:
        run = os.path.join(tmp, case)
        shutil.copytree(base, run)
        os.remove(os.path.join(run, "losses.tsv"))
        _damage(case, os.path.join(run, "checkpoints"))
        try:
            out[case] = _main(tmp, run, *EXTRA.get(case, []))
        except Exception as e:  # noqa: BLE001 - reported by the case's test
            out[case] = {"rc": None, "err": [repr(e)], "warnings": [], "losses": {}}
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("faults"))
    (out,) = run_distributed(run_cases, 1, tmp, CASES)
    out["tmp"] = tmp
    return out


def _error_line(r: dict) -> str:
    errors = [ln for ln in r["err"] if ln.startswith("mmpl train: error: ")]
    assert r["rc"] == 2 and len(errors) == 1 and not any("Traceback" in ln for ln in r["err"]), r
    return errors[0]


FILE_IN_REASON = {"flip_distcp": ("__0_0.distcp", "sha256"), "truncate_distcp": ("__0_1.distcp", "bytes"),
                  "delete_distcp": ("__0_0.distcp", "missing"), "garble_metadata": (".metadata", "sha256"),
                  "delete_common": ("common.pt", "missing"), "garble_rng": ("rng_tp1pp1cp1dp1_r0.pt", "sha256"),
                  "garble_tokenizer": ("tokenizer.json", "sha256"),
                  "old_truncate_distcp": (LATEST, "does not load"), "old_garble_metadata": (LATEST, "does not load"),
                  "old_delete_common": ("common.pt", "missing"),
                  "old_garble_rng": ("rng_tp1pp1cp1dp1_r0.pt", "does not load")}


def test_base_run_saved_verified_checkpoints(results):
    assert sorted(results["base"]["losses"]) == [1, 2, 3, 4] and results["base"]["rc"] == 0
    for name in (LATEST, OLDER):
        assert os.path.isfile(os.path.join(results["tmp"], "base", "checkpoints", name, MANIFEST))


@pytest.mark.parametrize("case", FALLBACK)
def test_corrupt_latest_warns_once_and_resumes_exactly_from_the_older(results, case):
    r = results[case]
    assert r["rc"] == 0, r
    corrupt = [w for w in r["warnings"] if w.startswith("corrupt checkpoint:")]
    assert len(corrupt) == 1 and "\n" not in corrupt[0], r["warnings"]
    name, why = FILE_IN_REASON[case]
    ckpts = os.path.join(results["tmp"], case, "checkpoints")
    assert name in corrupt[0] and why in corrupt[0], corrupt
    assert corrupt[0].endswith(f"; skipping it, trying {os.path.join(ckpts, OLDER)}"), corrupt
    assert sorted(r["losses"]) == [3, 4], r
    for step in (3, 4):
        assert r["losses"][step] == results["base"]["losses"][step], (case, step)
    if case.startswith("old_"):
        assert any("cannot be verified" in w for w in r["warnings"]), r["warnings"]
    # the new step-4 checkpoint holds none of the damage: its tokenizer is the base run's
    tokenizer = os.path.join("checkpoints", LATEST, "mmpl", "hf", "tokenizer.json")
    assert open(os.path.join(ckpts, "..", tokenizer), "rb").read() == \
        open(os.path.join(results["tmp"], "base", tokenizer), "rb").read()


def test_on_corrupt_fail_stops_with_one_line_naming_the_file(results):
    line = _error_line(results["fail"])
    assert "__0_0.distcp" in line and "sha256" in line and "checkpoint.on_corrupt=fallback" in line, line
    assert results["fail"]["losses"] == {}


def test_absent_rng_and_loader_state_warn_that_resume_is_not_exact(results):
    r = results["old_no_state"]
    assert r["rc"] == 0, r
    (w,) = [w for w in r["warnings"] if "is not exact" in w]
    assert "rng_tp1pp1cp1dp1_r0.pt" in w and "data_dp0.pt" in w and LATEST in w, w


def test_strict_resume_refuses_naming_the_file(results):
    line = _error_line(results["old_strict"])
    assert "strict_resume" in line and "rng_tp1pp1cp1dp1_r0.pt" in line and "data_dp0.pt" in line, line


def test_all_checkpoints_corrupt_is_one_error_after_a_warning_each(results):
    r = results["all_corrupt"]
    line = _error_line(r)
    assert "no usable checkpoint" in line, line
    assert len([w for w in r["warnings"] if w.startswith("corrupt checkpoint:")]) == 2, r["warnings"]


def _convert(*args: str) -> dict:
    """`mmpl convert ...` in this process; its exit code and stderr lines."""
    from megatron_mmpl.cli import main

    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        rc = main(["convert", *args])
    return {"rc": rc, "err": [ln for ln in err.getvalue().splitlines() if ln.strip()]}


def convert_cases(tmp: str, hf: str, run_ckpts: str) -> dict:
    """In a rank: hf-to-mcore of damaged HF dirs; mcore-to-hf of a good, a corrupt and a tokenizer-less one."""
    out = {}
    for case, damage in (("truncated_safetensors", lambda d: _truncate(os.path.join(d, "model.safetensors"))),
                         ("garbled_safetensors", lambda d: _flip(os.path.join(d, "model.safetensors"))),
                         ("garbled_header", lambda d: _garble_header(os.path.join(d, "model.safetensors"))),
                         ("bad_config", lambda d: open(os.path.join(d, "config.json"), "w").write("{bad"))):
        src = os.path.join(tmp, case)
        shutil.copytree(hf, src)
        damage(src)
        out[case] = _convert("hf-to-mcore", "--hf", src, "--out", os.path.join(tmp, f"{case}-mc"), "--dtype", "fp32")
    mc = os.path.join(tmp, "mc")
    out["import"] = _convert("hf-to-mcore", "--hf", hf, "--out", mc, "--dtype", "fp32")
    out["no_tokenizer"] = _convert("mcore-to-hf", "--ckpt", mc, "--out", os.path.join(tmp, "o1"))
    out["export"] = _convert("mcore-to-hf", "--ckpt", mc, "--out", os.path.join(tmp, "o2"), "--tokenizer", "none")
    _flip(os.path.join(mc, "__0_0.distcp"))
    out["corrupt_mc"] = _convert("mcore-to-hf", "--ckpt", mc, "--out", os.path.join(tmp, "o3"), "--tokenizer", "none")
    run = os.path.join(tmp, "run-ckpts")
    shutil.copytree(run_ckpts, run)
    _garble(os.path.join(run, LATEST, ".metadata"))
    out["corrupt_run"] = _convert("mcore-to-hf", "--ckpt", run, "--out", os.path.join(tmp, "o4"), "--tokenizer", "none")
    out["outputs"] = sorted(os.listdir(tmp))
    return out


def _garble_header(path: str) -> None:
    """Damage the JSON header of a safetensors file (the 8 bytes before it give its length)."""
    data = bytearray(open(path, "rb").read())
    data[9:40] = b"\x00" * 31
    open(path, "wb").write(bytes(data))


@pytest.fixture(scope="module")
def conversions(results, tmp_path_factory):
    from megatron_mmpl.models.qwen25vl.testing import tiny_hf_model

    tmp = tmp_path_factory.mktemp("convert")
    tiny_hf_model("tiny", seed=0).save_pretrained(tmp / "hf")
    (out,) = run_distributed(convert_cases, 1, str(tmp), str(tmp / "hf"),
                             os.path.join(results["tmp"], "base", "checkpoints"))
    out["tmp"] = str(tmp)
    return out


def _convert_error(r: dict) -> str:
    errors = [ln for ln in r["err"] if ln.startswith("mmpl convert: error: ")]
    assert r["rc"] == 2 and len(errors) == 1 and not any("Traceback" in ln for ln in r["err"]), r
    return errors[0]


@pytest.mark.parametrize("case, name", [("truncated_safetensors", "model.safetensors"),
                                        ("garbled_header", "model.safetensors"), ("bad_config", "config.json")])
def test_damaged_hf_checkpoint_is_one_line_naming_the_file(conversions, case, name):
    line = _convert_error(conversions[case])
    assert os.path.join(conversions["tmp"], case, name) in line and "re-download" in line, line
    assert f"{case}-mc" not in conversions["outputs"]


def test_flipped_bytes_in_safetensors_data_are_not_detectable(conversions):
    """safetensors has no checksums: 64 flipped bytes inside the tensor data convert (documented in RELIABILITY)."""
    assert conversions["garbled_safetensors"]["rc"] == 0, conversions["garbled_safetensors"]


def test_export_without_tokenizer_lists_none_among_the_fixes(conversions):
    line = _convert_error(conversions["no_tokenizer"])
    assert "--tokenizer qwen2 | tiny | <hf dir> | none" in line, line


def test_export_verifies_the_manifest_and_refuses_a_corrupt_checkpoint(conversions):
    assert conversions["import"]["rc"] == 0 and conversions["export"]["rc"] == 0, conversions
    line = _convert_error(conversions["corrupt_mc"])
    assert "__0_0.distcp" in line and "sha256" in line and "refusing to export" in line, line
    line = _convert_error(conversions["corrupt_run"])
    assert f"{LATEST}/.metadata" in line and "refusing to export" in line, line
    assert not {"o1", "o3", "o4"} & set(conversions["outputs"]), conversions["outputs"]
