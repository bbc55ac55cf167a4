"""Config: YAML + overrides round-trip, every field documented, and each bad value is one line naming its field."""

import dataclasses
import glob
import typing

import pytest

from megatron_mmpl.cli import main as cli_main
from megatron_mmpl.config import (
    Config,
    ConfigError,
    dump_yaml,
    field_docs,
    load_config,
    train_steps,
    validate_config,
    validate_layout,
    warmup_steps,
)
from megatron_mmpl.config.hf_config import preset_names, resolve_hf_config
from megatron_mmpl.models.qwen25vl.spec import ModelSpec

pytestmark = pytest.mark.unit

RECIPE = "examples/recipes/mmprolong-7b.yaml"
DENSE = ["parallel.tp=1", "parallel.cp=1", "parallel.sequence_parallel=false"]


def _walk(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield prefix + f.name
            yield from _walk(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_every_field_has_a_docstring():
    docs = field_docs()
    fields = list(_walk(Config))
    assert len(fields) > 40
    missing = [f for f in fields if not docs.get(f)]
    assert not missing, missing


def test_overrides_types_and_yaml_round_trip(tmp_path):
    cfg = load_config(RECIPE, ["parallel.tp=2", "optim.lr=2e-5", "data.task_weights={extraction: 1}",
                               "checkpoint.load=null", "model.freeze_vision=true", "seed=7"])
    assert cfg.parallel.tp == 2 and cfg.optim.lr == 2e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.data.task_weights == {"extraction": 1.0} and cfg.checkpoint.load is None
    assert cfg.model.freeze_vision is True and cfg.seed == 7
    path = tmp_path / "resolved.yaml"
    dump_yaml(cfg, str(path))
    assert load_config(str(path)) == cfg


def test_recipes_are_valid_and_7b_matches_the_paper():
    for path in sorted(glob.glob("examples/recipes/*.yaml")):
        validate_config(load_config(path))
    cfg = load_config(RECIPE)
    o = cfg.optim
    assert (o.lr, o.min_lr / o.lr, o.warmup, o.decay_style) == (1e-5, pytest.approx(0.1), 0.1, "cosine")
    assert (o.beta1, o.beta2, o.weight_decay, o.clip_grad) == (0.9, 0.95, 0.1, 1.0)
    assert cfg.data.task_weights == {"extraction": 0.8, "reasoning": 0.2}
    assert (cfg.data.min_len, cfg.data.max_len, cfg.data.recipe) == (32768, 131072, "balanced")
    steps = train_steps(cfg)
    assert steps * cfg.data.global_batch_size * cfg.data.max_seq_len >= 5e9
    assert warmup_steps(cfg) == round(0.1 * steps)
    assert validate_layout(cfg, world_size=64) == 64 // (cfg.parallel.tp * cfg.parallel.cp)


def test_presets_resolve_to_qwen_shapes():
    assert {"tiny", "qwen25vl-3b", "qwen25vl-7b"} <= set(preset_names())
    hf = resolve_hf_config(load_config(None, ["model.hf_config=qwen25vl-7b"]).model)
    t = hf.get_text_config()
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (3584, 28, 28, 4)
    m = ModelSpec.from_hf(hf)
    assert m.mrope_section == (16, 24, 24) and m.rope_theta == 1e6
    assert hf.vision_config.fullatt_block_indexes == [7, 15, 23, 31]
    hf3 = resolve_hf_config(load_config(None, ["model.hf_config=qwen25vl-3b", "model.rope_theta=5e6"]).model)
    assert hf3.tie_word_embeddings and ModelSpec.from_hf(hf3).rope_theta == 5e6


@pytest.mark.parametrize(
    "overrides, world, field",
    [
        (["optim.lrr=1"], None, "unknown key optim.lrr (did you mean optim.lr?)"),
        (["optim.lr=fast"], None, "optim.lr='fast' must be a number"),
        (["parallel.tp=two"], None, "parallel.tp='two' must be an integer"),
        (["model.recompute=some"], None, "model.recompute='some' must be one of"),
        (["checkpoint.on_corrupt=ignore"], None, "checkpoint.on_corrupt='ignore' must be one of fallback | fail"),
        (["checkpoint.strict_resume=maybe"], None, "checkpoint.strict_resume='maybe'"),
        (["data.recipe=long"], None, "data.recipe='long'"),
        (["optim.min_lr=1"], None, "optim.min_lr=1.0 is above optim.lr"),
        (["data.shards="], None, "data.shards is empty"),
        (["schedule.train_tokens=null"], None, "schedule.train_steps and schedule.train_tokens are both null"),
        (["parallel.sequence_parallel=true", "parallel.tp=1"], None, "parallel.sequence_parallel=true needs"),
        (["data.micro_batch_size=2"], None, "data.micro_batch_size=2: a micro-batch is one packed row"),
        (["parallel.tp=3", "parallel.cp=1"], 24, "parallel.tp=3 does not divide LM attention heads=28"),
        ([*DENSE, "parallel.pp=3"], 3, "parallel.pp=3 does not divide the 28 LM layers"),
        ([*DENSE, "parallel.pp=3", "parallel.first_stage_layers=4"], 3, None),
        ([*DENSE, "parallel.pp=3", "parallel.first_stage_layers=5"], 3,
         "parallel.first_stage_layers=5"),
        ([], 12, "parallel.tp*pp*cp=4*1*4=16 does not divide the world size 12"),
        ([*DENSE, "data.global_batch_size=4"], 8, "data.global_batch_size=4"),
    ],
)
def test_bad_values_give_one_line_naming_the_field(overrides, world, field):
    def check():
        cfg = load_config(RECIPE, overrides)
        validate_config(cfg)
        if world:
            validate_layout(cfg, world)

    if field is None:
        check()
        return
    with pytest.raises(ConfigError) as err:
        check()
    msg = str(err.value)
    assert msg.startswith("config error: ") and "\n" not in msg
    assert field in msg, msg


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="model.hf_config='nowhere'"):
        resolve_hf_config(load_config(None, ["model.hf_config=nowhere"]).model)


def test_ablation_arms_differ_from_the_main_recipe_only_where_they_say_and_each_plans(tmp_path):
    """examples/recipes/mmprolong-7b-*.yaml: `base:` the main recipe; same model, budget and optimizer; each fits
    on the hardware of its `# plan:` header."""
    main_cfg = load_config(RECIPE)
    arms = {p: load_config(p) for p in sorted(glob.glob("examples/recipes/mmprolong-7b-*.yaml"))}
    assert len(arms) == 3
    changed = {}
    for path, cfg in arms.items():
        assert (cfg.model, cfg.optim, cfg.schedule, cfg.parallel) == (main_cfg.model, main_cfg.optim,
                                                                       main_cfg.schedule, main_cfg.parallel)
        changed[path.split("-7b-")[1]] = {k: v for k, v in vars(cfg.data).items() if getattr(main_cfg.data, k) != v}
        assert cli_main(["plan", "--preset", path]) == 0
    assert changed == {"ocr.yaml": {"shards": "data/mmprolong-ocr-shards", "task_weights": {"ocr_transcribe": 1.0}},
                       "target128k.yaml": {"recipe": "target:131072"},
                       "vqa-short.yaml": {"sources": {"data/short-docvqa-shards": 0.2}}}
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="comes back to itself"):
        load_config(str(tmp_path / "a.yaml"))
    with pytest.raises(ConfigError, match="data.sources="):
        validate_config(load_config(RECIPE, ["data.sources={x: 1.5}"]))
