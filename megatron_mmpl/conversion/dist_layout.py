"""The TP1/PP1 dist-checkpoint layout of a Qwen2.5-VL model, without the model's memory.

The model is built on the meta device, so its `sharded_state_dict()` gives every checkpoint key, global shape and
offset (and megatron's gate/up factory for `linear_fc1`) at no cost. Conversion then streams through that layout:

- import (`Filler`, then `dist_checkpointing.save`): each converted tensor is cut into the layout's pieces, each
  piece a tensor with its own storage. Peak memory is one copy of the weights. (Saving a real model instead costs a
  second copy of every gated MLP: megatron's torch_dist writer clones any tensor that is a view into a larger
  storage, and fc1's gate/up halves are such views.)
- export (`GroupReader`): one layer at a time is read out of the checkpoint, whatever TP/PP it was saved at —
  torch DCP assembles each requested chunk from whichever ranks' files hold it — so memory holds one layer.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_mmpl.parallel.process_groups import Layout, initialize_parallel

_LAYER = re.compile(r"^(language_model|vision_model)\.decoder\.layers\.(\d+)\.")


def meta_layout(spec, dtype: torch.dtype) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the full TP1/PP1 model's sharded state dict on the meta device, its parameters by name, also on meta)."""

    from megatron_mmpl.models.qwen25vl.build import build_model

    if not dist.is_initialized():  # a 1-rank group; first, as it installs the CPU runtime's torch-function mode,
        initialize_parallel()      # which must outlive the `meta` device context below
    # use_cpu_initialization: megatron's linear layers otherwise allocate on `torch.cuda.current_device()`
    # whenever CUDA exists, which overrides the meta device (a 7B model in fp32 on the GPU of a conversion)
    with torch.device("meta"):
        model = build_model(spec, Layout(), dtype=dtype,
                            overrides={"perform_initialization": False, "use_cpu_initialization": True})
    off_meta = [n for n, p in model.named_parameters() if p.device.type != "meta"]
    if off_meta:
        raise AssertionError(f"parameters built outside the meta device: {off_meta[:3]}")
    return model.sharded_state_dict(), dict(model.named_parameters())


def group_of(name: str) -> str:
    """Parameters read together on export: one decoder layer / ViT block, or the tensor alone."""
    m = _LAYER.match(name)
    return m.group(0) if m else name


# ---- import ----------------------------------------------------------------------------------------------------


def _pieces(entry) -> list:
    """The ShardedTensors an entry saves as (a factory is built; its pieces are views of its meta tensor)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(entry, ShardedTensorFactory):
        return [v for v in nested_values(entry.build()) if isinstance(v, ShardedTensor)]
    if isinstance(entry, ShardedTensor):
        return [entry]
    raise TypeError(f"unexpected entry {type(entry).__name__} for a parameter")


class Filler:
    """Collects converted full tensors into the layout's pieces; `state_dict()` is ready for
    `dist_checkpointing.save` once every parameter is filled."""

    def __init__(self, sharded: dict, params: dict[str, torch.Tensor]):
        self.sharded, self.params = dict(sharded), params
        self.pieces = {n: _pieces(self.sharded[n]) for n in params}
        self.filled: set[str] = set()

    def fill(self, name: str, full: torch.Tensor) -> None:
        """Store the full TP1 tensor of parameter `name`, cut as the checkpoint saves it."""
        meta_param = self.params[name]
        if tuple(full.shape) != tuple(meta_param.shape):
            raise ValueError(f"{name}: converted shape {tuple(full.shape)} != model shape {tuple(meta_param.shape)}")
        full = full.to(meta_param.dtype).contiguous()
        for piece in self.pieces[name]:
            meta = piece.data  # the parameter itself, or a view of it (a factory's piece)
            if meta.shape == full.shape and meta.storage_offset() == 0:
                owns = full.untyped_storage().nbytes() == full.numel() * full.element_size()
                piece.data = full if owns else full.clone()
            else:
                piece.data = full.as_strided(meta.shape, meta.stride(), meta.storage_offset()).clone()
        self.sharded[name] = self.pieces[name][0] if len(self.pieces[name]) == 1 else list(self.pieces[name])
        self.filled.add(name)

    def state_dict(self) -> dict:
        missing = [n for n in self.pieces if n not in self.filled]
        if missing:
            raise ValueError(f"{len(missing)} parameter(s) were never filled: {missing}")
        return self.sharded


# ---- export ----------------------------------------------------------------------------------------------------


class _SliceLoadPlanner(LoadPlanner):
    """A torch.distributed.checkpoint load planner that reads given chunks of saved tensors into given tensors.

    Why not `dist_checkpointing.load`: megatron's torch_dist loader describes each key to torch as a sharded
    tensor whose fragments all exist somewhere, so it can only read whole stacked keys (every layer at once).
    torch DCP itself reads any chunk; this planner asks it for one layer's chunks. `requests`: key → list of
    (global offsets, destination tensor of the chunk's shape)."""

    def __init__(self, requests: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]]):
        self.requests = requests

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self):

        items = []
        for key, chunks in self.requests.items():
            if key not in self.metadata.state_dict_metadata:
                raise KeyError(f"the checkpoint has no tensor {key!r}; is it of this model? (--hf-config names the "
                               "model a checkpoint without mmpl/hf/config.json holds)")
            saved = self.metadata.state_dict_metadata[key]
            for off, dest in chunks:
                if len(off) != len(saved.size) or any(o + n > s for o, n, s in zip(off, dest.shape, saved.size)):
                    raise ValueError(f"{key}: chunk at {off} of shape {tuple(dest.shape)} is outside the saved "
                                     f"tensor of shape {tuple(saved.size)}: the checkpoint holds another model than "
                                     "the config describes (check --hf-config)")
            want = [ChunkStorageMetadata(offsets=torch.Size(off), sizes=dest.shape) for off, dest in chunks]
            items += create_read_items_for_chunk_list(key, saved, want)
        return LoadPlan(items)

    def create_global_plan(self, plans):
        return plans

    def finish_plan(self, plan):
        return plan

    def load_bytes(self, read_item, value) -> None:
        raise AssertionError(f"unexpected byte item {read_item.dest_index.fqn}")

    def resolve_tensor(self, read_item):
        dest = self.requests[read_item.dest_index.fqn][read_item.dest_index.index][1]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item, tensor) -> None:
        pass


class GroupReader:
    """`get(name)` → the full TP1 tensor of a parameter, read from a dist checkpoint one group (layer) at a time.

    Reading in plan order (layer-major) loads each group once; only the current group is held. Works for any
    TP/PP the checkpoint was saved at: each piece asks for its global chunk, whoever wrote it."""

    def __init__(self, ckpt_dir: str, sharded: dict, params: dict[str, torch.Tensor]):

        self.sharded, self.params, self.names = sharded, params, list(params)
        self.storage = FileSystemReader(str(ckpt_dir))
        self.metadata = self.storage.read_metadata()
        self.storage.set_up_storage_reader(self.metadata, True)
        self.groups: dict[str, list[str]] = {}
        for n in self.names:
            self.groups.setdefault(group_of(n), []).append(n)
        self.current: tuple[str, dict] = ("", {})

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        out, requests = {}, {}
        for n in names:
            meta = self.params[n]
            out[n] = torch.empty(meta.shape, dtype=meta.dtype)
            # the meta entry pointed at the new tensor: a factory's pieces are then views of it
            for piece in _pieces(dataclasses.replace(self.sharded[n], data=out[n])):
                if piece.flattened_range is not None:
                    raise NotImplementedError(f"{piece.key}: flattened model tensors are not supported")
                lead = (None,) * piece.prepend_axis_num  # the layer axis of stacked keys
                requests.setdefault(piece.key, []).append((tuple(piece.global_offset), piece.data[lead]))
        planner = _SliceLoadPlanner(requests)
        planner.set_up_planner({}, self.metadata, True)
        plan = self.storage.prepare_local_plan(planner.create_local_plan())
        plan = planner.finish_plan(self.storage.prepare_global_plan([plan])[0])
        self.storage.read_data(plan, planner).wait()
        return out

    def get(self, name: str) -> torch.Tensor:
        group = group_of(name)
        if self.current[0] != group:
            self.current = ("", {})  # drop the previous group before reading the next
            self.current = (group, self._read(self.groups[group]))
        return self.current[1][name]
