"""Run/DeepSpeed config loading: every shipped config validates, overrides, layering, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretraining.config import BatchConfig, load_config

REPO = Path(__file__).resolve().parents[2]
DS_CONFIGS = sorted((REPO / "ds_configs").glob("*.json"))
RUN_CONFIGS = sorted((REPO / "pretraining" / "configs").glob("*.yaml"))
MINIMAL = {"output_dir": "out", "max_steps": 10, "data": {"shard_dir": "shards"}}


def test_shipped_configs_exist():
    names = {p.name for p in DS_CONFIGS}
    for needed in ("bert_base_seq512_lamb_fp16.json", "bert_base_seq512_adam_fp16.json", "bert_base_seq512_lamb_bf16.json",
                   "bert_base_seq128_phase1_lamb_fp16.json", "bert_large_seq512_lamb_fp16.json",
                   "bert_base_seq512_zero2_bf16.json", "bert_base_seq512_zero3_bf16.json", "tiny_cpu.json"):
        assert needed in names
    stages = {json.loads(p.read_text())["zero_optimization"]["stage"] for p in DS_CONFIGS}
    assert {1, 2, 3} <= stages
    assert len(RUN_CONFIGS) >= 3


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_every_ds_config_validates(path):
    import deepspeed.runtime.config as ds_runtime_config

    cfg = load_config(MINIMAL, path)
    raw = json.loads(path.read_text())
    world = 1 if "tiny" in path.name or "cpu" in path.name else 8  # CPU recipes: one or two ranks
    resolved = cfg.batch.resolved(world)
    assert resolved["train_batch_size"] == raw["train_batch_size"]
    if "seq512" in path.name:
        assert raw["train_batch_size"] == 192  # BioBERT's global batch
    assert cfg.optimizer.name == {"Lamb": "lamb", "Adam": "adamw", "AdamW": "adamw"}[raw["optimizer"]["type"]]
    assert cfg.optimizer.lr == raw["optimizer"]["params"]["lr"]
    # DeepSpeed's own parser accepts what we pass it (optimizer section removed, batch resolved; without a process
    # group it assumes one rank)
    ds_runtime_config.DeepSpeedConfig(cfg.deepspeed_dict(1, hidden_size=768))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_run_config_validates(path, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # recipes travel: their DeepSpeed JSON is found from any directory
    required = ["model.init=/models/bert"] if "init: ???" in path.read_text() else []
    cfg = load_config(path.stem, None, required)  # by name, as users select packaged recipes
    assert cfg.max_steps >= 1 and cfg.data.shard_dir and cfg.deepspeed_dict(1, 768)["train_batch_size"]
    assert cfg.schedule.total_steps >= cfg.schedule.warmup_steps


def test_the_biobert_recipe_names_its_model():
    with pytest.raises(ValueError, match=r"model.init is required by this config .*add model.init=VALUE"):
        load_config("biobert_continued_seq512")
    cfg = load_config("biobert_continued_seq512", None, ["model.init=bert-base-cased"])
    assert cfg.model.init == "bert-base-cased" and cfg.batch.global_batch_size == 192


def test_overrides_and_types(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("output_dir: o\nmax_steps: 5\ndata: {shard_dir: s}\nschedule: {warmup_steps: 2}\n")
    cfg = load_config(run, REPO / "ds_configs" / "tiny_cpu.json",
                      ["optimizer.lr=1e-4", "optimizer.betas=[0.9, 0.98]", "max_steps=20", "model.init=null",
                       "model.preset=tiny", "ds.zero_optimization.stage=3", "ds.train_micro_batch_size_per_gpu=1"])
    assert cfg.optimizer.lr == 1e-4 and isinstance(cfg.optimizer.lr, float)
    assert cfg.optimizer.betas == (0.9, 0.98)
    assert cfg.max_steps == 20 and cfg.schedule.total_steps == 20  # derived from max_steps
    assert cfg.model.init is None and cfg.zero_stage == 3
    assert cfg.grad_accum(2) == 4 and cfg.batch.micro(2) == 1
    ds = cfg.deepspeed_dict(2)
    assert "optimizer" not in ds  # we build the optimizer; DeepSpeed gets it as a client optimizer
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["overlap_comm"] is True  # extra kept


def test_yaml_scientific_notation_is_a_number(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("output_dir: o\nmax_steps: 5\ndata: {shard_dir: s}\n")
    ds = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2}
    assert load_config(run, ds, ["optimizer.lr=3e-5"]).optimizer.lr == 3e-5
    run.write_text("output_dir: o\nmax_steps: 5\ndata: {shard_dir: s}\noptimizer: {lr: 3e-5}\n")  # YAML 1.1: a str
    assert load_config(run, ds).optimizer.lr == 3e-5


@pytest.mark.parametrize("world,micro,accum", [(1, 24, 8), (2, 24, 4), (8, 24, 1), (32, 6, 1), (64, 3, 1)])
def test_recipe_global_batch_holds_at_any_world_size(world, micro, accum):
    """The seq-512 recipes: global 192 with micro-batch at most 24, from one GPU to 8 nodes."""
    recipe = json.loads((REPO / "ds_configs" / "bert_base_seq512_lamb_bf16.json").read_text())
    batch = BatchConfig(global_batch_size=recipe["train_batch_size"],
                        micro_batch_size=recipe["train_micro_batch_size_per_gpu"],
                        grad_accum_steps=recipe.get("gradient_accumulation_steps"))
    assert batch.derive(world) == (micro, accum)
    assert batch.resolved(world) == dict(train_batch_size=192, train_micro_batch_size_per_gpu=micro,
                                         gradient_accumulation_steps=accum)


def test_batch_derivation_rules_and_refusals():
    assert BatchConfig(global_batch_size=52, micro_batch_size=24).derive(2) == (13, 2)  # per rank 26: the largest divisor <= 24
    assert BatchConfig(global_batch_size=192, grad_accum_steps=4).derive(2) == (24, 4)  # accumulation without a micro-batch: max = 96 / 4
    assert BatchConfig(micro_batch_size=4, grad_accum_steps=2).resolved(3) == dict(train_batch_size=24, train_micro_batch_size_per_gpu=4,
                                                       gradient_accumulation_steps=2)
    assert BatchConfig(global_batch_size=192, micro_batch_size=24, grad_accum_steps=2).derive(8) == (24, 1)  # an accumulation for another world size is re-derived
    with pytest.raises(ValueError, match=r"global batch 192 is not divisible by the world size 5: set "
                                         r"batch.global_batch_size=190 or batch.global_batch_size=195, or run on 4 or 6 "
                                         r"ranks"):
        BatchConfig(global_batch_size=192, micro_batch_size=24).derive(5)
    with pytest.raises(ValueError, match=r"world size 128: .*=128 or .*=256, or run on 96 or 192 ranks"):
        BatchConfig(global_batch_size=192, micro_batch_size=24).derive(128)
    with pytest.raises(ValueError, match="positive integer"):
        BatchConfig(global_batch_size=192, micro_batch_size=0)


def test_clear_errors(tmp_path):
    ds = REPO / "ds_configs" / "tiny_cpu.json"
    with pytest.raises(ValueError, match=r"unknown key 'optimizer.lrr'; did you mean 'optimizer.lr'\?"):
        load_config(MINIMAL, ds, ["optimizer.lrr=1"])
    with pytest.raises(ValueError, match="optimizer.lr is 0.1 in run config but 0.003 in"):
        load_config({**MINIMAL, "optimizer": {"lr": 0.1}}, ds)  # recipe and run config disagree
    assert load_config({**MINIMAL, "optimizer": {"lr": 0.003}}, ds).optimizer.lr == 0.003  # agreeing is fine
    with pytest.raises(ValueError, match=r"data.shard_dir is required \(.*\): add data.shard_dir=VALUE"):
        load_config({"output_dir": "o", "max_steps": 1}, ds)
    with pytest.raises(ValueError, match="not key=value"):
        load_config(MINIMAL, ds, ["optimizer.lr"])
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        load_config({**MINIMAL, "checkpoint": {"keep_last": 0}}, ds)
    with pytest.raises(ValueError, match="warmup_steps 50 > total_steps 10"):
        load_config({**MINIMAL, "schedule": {"warmup_steps": 50}}, ds)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{bad}: not valid JSON"):
        load_config(MINIMAL, bad)
    with pytest.raises(FileNotFoundError, match="missing.json': no such file, and not a packaged recipe"):
        load_config(MINIMAL, tmp_path / "missing.json")
    with pytest.raises(ValueError, match="scheduler.type 'OneCycle' unsupported"):
        load_config(MINIMAL, {"train_batch_size": 2, "scheduler": {"type": "OneCycle"}})


def test_deepspeed_scheduler_section_translates():
    cfg = load_config(MINIMAL, {"train_batch_size": 2, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
                                "scheduler": {"type": "WarmupDecayLR",
                                              "params": {"warmup_num_steps": 3, "total_num_steps": 9}}})
    assert (cfg.optimizer.name, cfg.schedule.warmup_steps, cfg.schedule.total_steps) == ("adamw", 3, 9)
    assert "scheduler" not in cfg.deepspeed_dict(1)


def test_rank_discovery_from_every_launcher():
    from biobert.dist import discover, master_addr

    d = discover({})
    assert (d.rank, d.local_rank, d.world_size, d.launcher) == (0, 0, 1, "python")
    d = discover({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (d.rank, d.local_rank, d.world_size, d.launcher) == (3, 1, 4, "torchrun/deepspeed")
    d = discover({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8"})
    assert (d.rank, d.local_rank, d.world_size, d.launcher) == (5, 1, 8, "srun")
    d = discover({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"})
    assert (d.rank, d.world_size, d.launcher) == (1, 2, "openmpi")
    d = discover({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"})
    assert (d.rank, d.world_size, d.launcher) == (2, 4, "mpich")
    # mpirun inside a Slurm job: rank 1's daemon was started by a 1-task srun step on the second node, whose
    # SLURM_* the rank inherits; its rank is mpirun's
    d = discover({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "OMPI_COMM_WORLD_RANK": "1",
                  "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})
    assert (d.rank, d.local_rank, d.world_size, d.launcher) == (1, 0, 2, "openmpi")
    assert master_addr({"SLURM_JOB_NODELIST": "gpu[03-05,07],cpu1"}) == "gpu03"
    assert master_addr({"SLURM_JOB_NODELIST": "node7", "MASTER_ADDR": "10.0.0.1"}) == "10.0.0.1"


def test_lamb_with_zero_partitioning_is_refused():
    ds = REPO / "ds_configs" / "tiny_cpu.json"  # AdamW, ZeRO-2
    with pytest.raises(ValueError, match="LAMB with ZeRO stage 2"):
        load_config(MINIMAL, ds, ["optimizer.name=lamb"])
    assert load_config(MINIMAL, ds, ["optimizer.name=lamb", "ds.zero_optimization.stage=0"]).zero_stage == 0
    opted_in = load_config(MINIMAL, ds, ["optimizer.name=lamb", "optimizer.allow_lamb_with_zero=true"])
    assert opted_in.optimizer.name == "lamb" and opted_in.zero_stage == 2


def test_deepspeed_json_is_read_into_typed_sections_and_checked():
    cfg = load_config(MINIMAL, "bert_base_seq512_lamb_fp16")  # a packaged recipe by name
    assert (cfg.engine.precision, cfg.engine.zero_stage, cfg.engine.gradient_clipping) == ("fp16", 0, 1.0)
    ds = cfg.deepspeed_dict(8)
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and "bf16" not in ds
    with pytest.raises(ValueError, match="unknown DeepSpeed key 'zero_optimisation'; did you mean 'zero_optimization'"):
        load_config(MINIMAL, "tiny_cpu", ["ds.zero_optimisation.stage=1"])
    with pytest.raises(ValueError, match="fp16 and bf16 are both enabled"):
        load_config(MINIMAL, {"train_batch_size": 8, "fp16": {"enabled": True}, "bf16": {"enabled": True}})
    with pytest.raises(FileNotFoundError, match="did you mean 'tiny_cpu'"):
        load_config(MINIMAL, "tiny_cpus")


def test_auto_values_resolve_like_hf():
    """HF's rule: 'auto' batch keys come from the rest of the config, 'auto' ZeRO buckets from the hidden size."""
    cfg = load_config(MINIMAL, "tiny_cpu", ["ds.train_micro_batch_size_per_gpu=auto",
                                            "ds.zero_optimization.reduce_bucket_size=auto"])
    assert cfg.batch.micro_batch_size is None and cfg.batch.global_batch_size == 8
    ds = cfg.deepspeed_dict(2, hidden_size=64)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (4, 1)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 64 * 64
