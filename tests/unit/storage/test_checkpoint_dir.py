"""Checkpoint discovery: the tracker wins while its checkpoint is complete; partial and incomplete dirs are never
loaded; a load path is a run dir (resume) or one dist checkpoint (model)."""

import pytest

from megatron_mmpl.storage import checkpoint_dir as ckpt

pytestmark = pytest.mark.unit


def test_latest_checkpoint_ignores_partial_and_incomplete(tmp_path):
    root = str(tmp_path)
    assert ckpt.latest_step(root) is None
    for step, complete in ((10, True), (20, True), (30, False)):
        d = tmp_path / f"iter_{step:07d}"
        d.mkdir()
        if complete:
            (d / "metadata.json").write_text("{}")
    (tmp_path / "iter_0000040.partial").mkdir()
    assert ckpt.complete_steps(root) == [10, 20] and ckpt.latest_step(root) == 20
    (tmp_path / ckpt.TRACKER).write_text("10")
    assert ckpt.latest_step(root) == 10  # the tracker wins while its checkpoint is complete
    (tmp_path / ckpt.TRACKER).write_text("30")
    assert ckpt.latest_step(root) == 20  # ... and is ignored when it names an incomplete one
    assert ckpt.classify_load_path(root) == "resume"
    assert ckpt.classify_load_path(str(tmp_path / "iter_0000010")) == "model"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.classify_load_path(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        ckpt.classify_load_path(str(tmp_path / "iter_0000030"))
