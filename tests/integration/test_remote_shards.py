"""Shards served over HTTP by a real nginx on 127.0.0.1: the training loader reads them by byte range with the
same batches and exact resume as from a path; stock webdataset reads the same samples; a server without Range
support is refused loudly."""

import pytest

from megatron_mmpl.data.loader import build_train_loader
from megatron_mmpl.data.schema import Sample
from megatron_mmpl.data.shards import load_index, load_shard_samples, read_members
from megatron_mmpl.data.tokenizer import build_tiny_tokenizer

from ..requires import require_module
from ..unit.data.shardsets import make_needle_shards
from ..unit.data.test_loader import _opts, _same, _take
from .http_server import nginx, python_http_server

pytestmark = pytest.mark.integration
require_module("aiohttp", "fsspec's HTTP backend is missing: pip install 'megatron_mmpl[http]'")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    www = tmp_path_factory.mktemp("www")
    make_needle_shards(www / "shards")
    logs = tmp_path_factory.mktemp("nginx")
    with nginx(www, logs) as url:
        yield www / "shards", f"{url}/shards", logs / "access.log"


def test_loader_reads_url_like_a_path_with_exact_resume(served):
    local, url, access_log = served
    tok = build_tiny_tokenizer()
    ref = _take(build_train_loader(_opts(local), tok, dp_rank=0, dp_size=1), 6)
    first = build_train_loader(_opts(url), tok, dp_rank=0, dp_size=1)  # 2 loader workers
    assert all(_same(a, b) for a, b in zip(_take(first, 3), ref[:3]))
    fresh = build_train_loader(_opts(url), tok, dp_rank=0, dp_size=1)
    fresh.load_state_dict(first.state_dict())
    assert all(_same(a, b) for a, b in zip(_take(fresh, 3), ref[3:])), "resume from a URL is exact"
    rank1 = _take(build_train_loader(_opts(url, num_workers=0), tok, dp_rank=1, dp_size=2), 2)
    assert all(_same(a, b) for a, b in zip(rank1, _take(build_train_loader(_opts(local, num_workers=0), tok,
                                                                           dp_rank=1, dp_size=2), 2)))
    statuses = [line.split()[0] for line in access_log.read_text().splitlines()]
    assert statuses.count("206") >= 6 * 2, "samples are read as byte ranges (206 Partial Content)"


def test_a_forked_worker_that_exits_leaves_the_parents_reads_working(served):
    """A loader worker is a fork: when it lets go of the connections it inherited, the parent's next read must
    still get its reply (data/storage.py detaches the parent's fsspec loop in the child). Without that, this read
    hung until aiohttp's timeout."""
    import gc
    import os

    import fsspec.asyn

    from megatron_mmpl.data.storage import _fs, read_bytes

    _, url, _ = served
    index = read_bytes(f"{url}/index.json")  # the parent's loop now holds a keep-alive connection
    pid = os.fork()
    if pid == 0:  # the worker: its first fsspec call drops the inherited filesystems, then it exits
        try:
            read_bytes(f"{url}/index.json")
            gc.collect()
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    fs, path = _fs(f"{url}/index.json", None)
    assert fsspec.asyn.sync(fs.loop, fs._cat_file, path, timeout=20) == index


def test_stock_webdataset_reads_our_shards_locally_and_over_http(served):
    wds = pytest.importorskip("webdataset")
    local, url, _ = served
    index = load_index(local)
    ours = {}
    for sh in index["shards"]:
        with open(local / sh["path"], "rb") as f:
            for _key, off, nb, _n in load_shard_samples(local, sh):
                key, members = read_members(f, off, nb)
                ours[key] = members
    for base in (str(local), url):
        got = {}
        ds = wds.WebDataset([f"{base}/{sh['path']}" for sh in index["shards"]], shardshuffle=False,
                            nodesplitter=None, workersplitter=None)
        for s in ds:
            got[s["__key__"]] = {k: v for k, v in s.items() if not k.startswith("__")}
        assert got == ours, f"webdataset over {base} sees other samples than our reader"
    s = Sample.from_members(next(iter(ours)), ours[next(iter(ours))])
    assert s.n_tokens > 0 and len(s.pages) == len(s.page_exts)


def test_server_without_range_support_is_refused(tmp_path):
    make_needle_shards(tmp_path / "shards", per_pool=2)
    with python_http_server(tmp_path) as url:
        loader = build_train_loader(_opts(f"{url}/shards", num_workers=0, max_consecutive_failures=2),
                                    build_tiny_tokenizer(), dp_rank=0, dp_size=1)
        with pytest.raises(RuntimeError, match="ignores HTTP Range requests"):
            _take(loader, 1)
