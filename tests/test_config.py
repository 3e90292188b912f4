from pathlib import Path

import pytest

from ringada import config as C

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_dump_round_trips(tmp_path):
    cfg = C.Config()
    path = tmp_path / "c.yaml"
    path.write_text(C.dump(cfg))
    assert C.load(path) == cfg


def test_set_overrides_file_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.1\ndata:\n  batch_size: 4\n")
    cfg = C.load(path, ["optim.lr=0.5", "data.shuffle=false", "adapter.target_modules=[q_proj, k_proj]",
                        "pipeline.mode=ring", "pipeline.partition=[1, 2]", "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.lr == 0.5 and cfg.data.batch_size == 4 and cfg.data.shuffle is False
    assert cfg.adapter.target_modules == ["q_proj", "k_proj"]
    assert cfg.pipeline.partition == [1, 2] and cfg.optim.betas == [0.8, 0.9]
    assert isinstance(C.load(None, ["optim.lr=1"]).optim.lr, float)  # ints widen to float


@pytest.mark.parametrize("overrides, words", [
    (["nosuch.key=1"], ["nosuch", "unknown section", "run"]),
    (["optim.lrr=1"], ["optim.lrr", "unknown key", "lr"]),
    (["run.steps=ten"], ["run.steps", "'ten'", "integer"]),
    (["run.steps=1.5"], ["run.steps", "1.5", "integer"]),
    (["data.shuffle=3"], ["data.shuffle", "true or false"]),
    (["run.steps=0"], ["run.steps", "0", ">= 1"]),
    (["optim.lr=-1"], ["optim.lr", "-1", "> 0"]),
    (["optim.betas=[0.9]"], ["optim.betas", "[0.9]", "two numbers"]),
    (["optim.grad_clip=-0.5"], ["optim.grad_clip", "-0.5"]),
    (["adapter.kind=prefix"], ["adapter.kind", "'prefix'", "'lora'", "'bottleneck'"]),
    (["adapter.r=0"], ["adapter.r", "0", ">= 1"]),
    (["adapter.dropout=1.0"], ["adapter.dropout", "1.0"]),
    (["adapter.kind=bottleneck", "adapter.target_modules=[q_proj]"], ["adapter.target_modules", "lora"]),
    (["adapter.target_modules=[]"], ["adapter.target_modules", "[]"]),
    (["pipeline.mode=tree"], ["pipeline.mode", "'tree'", "'ring'"]),
    (["pipeline.schedule=zb"], ["pipeline.schedule", "'gpipe'", "'1f1b'"]),
    (["pipeline.partition=half"], ["pipeline.partition", "'half'", "even"]),
    (["pipeline.mode=ring", "pipeline.partition=[2, -1]"], ["pipeline.partition", ">= 0"]),
    (["pipeline.partition=[2, 2]"], ["pipeline.partition", "single"]),
    (["run.steps=1", "pipeline.mode=sfl", "pipeline.early_stop=false"], ["pipeline.early_stop", "single, ring and line"]),
    (["run.steps=1", "pipeline.mode=sfl", "run.checkpoint_every=1"], ["run.checkpoint_every", "every round"]),
    (["run.steps=1", "pipeline.mode=sfl", "star.emulate=true"], ["star.profile", "null", "star.emulate", "edge4"]),
    (["run.timeout_s=0"], ["run.timeout_s", "0", "> 0"]),
    (["run.resume=maybe"], ["run.resume", "'maybe'", "'auto'"]),
    (["optim.on_nonfinite=ignore"], ["optim.on_nonfinite", "'stop'", "'skip'"]),
    (["run.checkpoint_every=-1"], ["run.checkpoint_every", "-1", ">= 0"]),
    (["data.micro_batches=9"], ["data.micro_batches", "9", "batch_size (8)"]),
    (["data.micro_batches=0"], ["data.micro_batches", "0"]),
    (["data.seq_len=1"], ["data.seq_len", ">= 2"]),
    (["data.train=corpus.csv"], ["data.train", "corpus.csv", ".jsonl"]),
    (["data.train=polarity"], ["data.train", "classification corpus", "causal_lm"]),
    (["model.task=classification"], ["model.num_labels", "0", ">= 2"]),
    (["model.num_labels=2"], ["model.num_labels", "only task=classification"]),
    (["model.task=classification", "model.num_labels=2", "data.train=a.txt", "data.eval=null"],
     ["data.train", "a.txt", "label"]),
    (["model.task=regression"], ["model.task", "'causal_lm'", "'classification'"]),
    (["unfreeze.by=loss"], ["unfreeze.by", "'plateau'"]),
    (["unfreeze.increment=0"], ["unfreeze.increment", ">= 1"]),
    (["unfreeze.every=-1"], ["unfreeze.every", "-1"]),
    (["run.eval_every=-2"], ["run.eval_every", "-2"]),
    (["run.steps=1", "pipeline.mode=sfl", "optim.grad_clip=1.0"], ["optim.grad_clip", "star modes do not clip"]),
    (["run.steps=1", "pipeline.mode=sfl", "star.devices_per_round=2", "star.min_devices=3"], ["star.min_devices", "skipped"]),
    (["pipeline.mode=sfl", "run.steps=3"], ["run.steps", "star.rounds * star.local_steps"]),
    (["run.steps=1", "pipeline.mode=sfl", "data.micro_batches=2"], ["data.micro_batches", "star modes"]),
    (["run.steps=1", "pipeline.mode=sfl", "star.server_micro_batches=9"],
     ["star.server_micro_batches", "9", "data.batch_size (8)"]),
    (["run.steps=1", "pipeline.mode=sft", "star.server_micro_batches=2", "star.label_privacy=true"],
     ["star.server_micro_batches", "label_privacy", "set it to 1"]),
    (["run.steps=1", "pipeline.mode=sfl", "star.server_micro_batches=2", "adapter.dropout=0.1"],
     ["star.server_micro_batches", "adapter.dropout=0.1"]),
    (["run.steps=1", "pipeline.mode=sft", "star.allocate=true"], ["star.profile", "null"]),
    (["run.steps=1", "pipeline.mode=sfl", "star.allocate=true", "star.profile=p.yaml"], ["star.allocate", "sft"]),
    (["run.steps=1", "pipeline.mode=sfl", "star.mobility=exponential"], ["star.dwell_mean", "> 0"]),
    (["compress.topk=0.1"], ["compress", "star modes"]),
    (["run.steps=1", "pipeline.mode=sft", "compress.topk=0"], ["compress.topk", "(0, 1]"]),
    (["run.steps=1", "pipeline.mode=sft", "compress.bits=4", "compress.hadamard=48"],
     ["compress.hadamard", "48", "power of two"]),
    (["run.steps=1", "pipeline.mode=sft", "compress.grad_bits=17"], ["compress.grad_bits", "17", "null"]),
    (["run.steps=1", "pipeline.mode=sft", "compress.bits=4", "compress.outliers=0.7"],
     ["compress.outliers", "0.7", "[0, 0.5]"]),
    (["run.steps=1", "pipeline.mode=sft", "compress.bits=4", "compress.group=0"], ["compress.group", "0", ">= 1"]),
    (["run.steps=1", "pipeline.mode=sft", "compress.scale=channel"], ["compress.scale", "'channel'", "'token'"]),
    (["run.steps=1", "pipeline.mode=sft", "compress.eval=sometimes"], ["compress.eval", "'exact'", "'codec'"]),
    (["run.steps=1", "pipeline.mode=sft", "compress.hadamard=64"],
     ["compress.hadamard", "64", "compress.bits=0", "set compress.bits"]),
    (["run.steps=1", "pipeline.mode=sft", "compress.grad_bits=4", "compress.rounding=nearest"],
     ["compress.rounding", "'nearest'", "activations"]),
    (["run.steps=1", "pipeline.mode=sft", "compress.bits=4", "compress.scale=token", "compress.group=32"],
     ["compress.group", "32", "scale=group"]),
    (["run.steps=1", "pipeline.mode=sft", "compress.bits=8", "compress.grad_bits=0", "compress.error_feedback=true"],
     ["compress.error_feedback", "grad_bits=0", "lossy gradients"]),
    (["run.steps=1", "pipeline.mode=sft", "compress.lossless=zlib", "compress.eval=codec"],
     ["compress.eval", "'codec'", "nothing is compressed lossily"]),
    (["pipeline.mode=ring", "compress.bits=4"], ["compress.bits=4", "pipeline.compress=true"]),
    (["pipeline.mode=ring", "pipeline.compress=true"], ["pipeline.compress", "all defaults"]),
    (["run.steps=1", "pipeline.mode=sfl", "pipeline.compress=true", "compress.bits=4"],
     ["pipeline.compress", "'sfl'", "ring and line"]),
])
def test_rejections_name_key_value_and_fix(overrides, words):
    with pytest.raises(C.ConfigError) as err:
        C.load(None, overrides)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


@pytest.mark.parametrize("text, words", [
    ("optim.lr", ["key=value"]),
    ("lr=1", ["section.key=value"]),
    ("optim.lr=[1", ["not valid YAML"]),
])
def test_malformed_set_is_rejected(text, words):
    with pytest.raises(C.ConfigError) as err:
        C.load(None, [text])
    assert all(w in str(err.value) for w in words)


def test_file_errors(tmp_path):
    with pytest.raises(C.ConfigError, match="no such file"):
        C.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(C.ConfigError, match="mapping"):
        C.load(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("data:\n  batchsize: 3\n")
    with pytest.raises(C.ConfigError, match="data.batchsize: unknown key"):
        C.load(unknown)


@pytest.mark.parametrize("mode, partition, world, blocks, words", [
    ("ring", [2, 2], 3, 4, ["2 entries", "WORLD_SIZE(3)"]),
    ("ring", [1, 2, 2], 3, 4, ["sum 5", "4 blocks"]),
    ("ring", [2, 0, 2], 3, 4, ["rank(s) [1]", "0 blocks"]),
    ("single", "even", 2, 4, ["WORLD_SIZE=2", "torchrun"]),
])
def test_checks_against_model_and_world(mode, partition, world, blocks, words):
    cfg = C.Config(pipeline=C.PipelineConfig(mode=mode, partition=partition))
    with pytest.raises(C.ConfigError) as err:
        C.check_against_model(cfg, blocks, world)
    assert all(w in str(err.value) for w in words), str(err.value)


def test_initial_above_block_count_is_rejected():
    cfg = C.Config(unfreeze=C.UnfreezeConfig(initial=31, every=2))
    with pytest.raises(C.ConfigError, match="unfreeze.initial: got 31; the model has 30 blocks"):
        C.check_against_model(cfg, 30, 1)
    C.check_against_model(C.Config(pipeline=C.PipelineConfig(mode="ring", partition=[0, 2, 2])), 4, 3)


def test_every_shipped_config_loads():
    files = sorted((REPO / "configs").glob("*.yaml"))
    assert files
    for path in files:
        C.load(path)


def test_star_checks_against_world_and_model():
    cfg = C.load(None, ["run.steps=1", "pipeline.mode=sfl", "star.device_blocks=[1, 2]", "star.schedule=optimal"])
    with pytest.raises(C.ConfigError, match=r"2 entries\) for 3 devices"):
        C.check_against_model(cfg, 30, 4)
    with pytest.raises(C.ConfigError, match="at most 29"):
        C.check_against_model(C.load(None, ["run.steps=1", "pipeline.mode=sfl", "star.device_blocks=[30]"]), 30, 3)
    with pytest.raises(C.ConfigError, match="optimal.*9 devices per round"):
        C.check_against_model(C.load(None, ["run.steps=1", "pipeline.mode=sfl", "star.schedule=optimal"]), 30, 10)
    with pytest.raises(C.ConfigError, match="need a server and >= 1 device"):
        C.check_against_model(C.load(None, ["run.steps=1", "pipeline.mode=sft"]), 30, 1)


def test_lora_target_typos_are_rejected_before_any_process_starts(tiny_dirs):
    from ringada.adapters import check_target_modules

    cfg = C.load(None, ["adapter.target_modules=[q_proj, qproj]"])
    with pytest.raises(C.ConfigError, match=r"\['qproj'\] match no module in a block; available: .*q_proj"):
        check_target_modules(cfg.adapter, str(tiny_dirs["llama"]), "causal_lm")
    check_target_modules(C.load(None, ["adapter.target_modules=[c_attn]"]).adapter, str(tiny_dirs["gpt2"]),
                         "causal_lm")


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("5e-5", 5e-5), ("1E4", 1e4), ("+.5e1", 5.0)])
def test_scientific_numbers_are_floats(text, value):
    # PyYAML (YAML 1.1) reads these as strings
    lr = C.load(None, [f"optim.lr={text}"]).optim.lr
    assert isinstance(lr, float) and lr == value


def test_scientific_numbers_in_a_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-4\n  eps: 1E-6\n")
    cfg = C.load(path)
    assert cfg.optim.lr == 0.0001 and cfg.optim.eps == 1e-6 and isinstance(cfg.optim.lr, float)
    assert C.load(None, ["optim.betas=[9e-1, 999e-3]"]).optim.betas == [0.9, 0.999]  # list items too


@pytest.mark.parametrize("text, words", [
    ("optim.lr=abc", ["optim.lr", "'abc'", "expected a number"]),
    ("optim.lr=inf", ["optim.lr", "'inf'", "expected a number"]),
    ("optim.lr=.inf", ["optim.lr", "inf", "finite"]),
    ("optim.lr=1e999", ["optim.lr", "inf", "finite"]),
    ("optim.lr=.nan", ["optim.lr", "nan", "finite"]),
    ("optim.lr=1e-3x", ["optim.lr", "'1e-3x'", "expected a number"]),
    ("run.steps=1e3", ["run.steps", "'1e3'", "expected an integer (write 1000)"]),
])
def test_numbers_that_are_not_accepted(text, words):
    with pytest.raises(C.ConfigError) as err:
        C.load(None, [text])
    assert all(w in str(err.value) for w in words), str(err.value)


@pytest.mark.parametrize("mode, given, unused", [
    # a key set to its default says nothing (a run's own config.yaml lists every key)
    ("ring", {"star": {"rounds": 2, "device_blocks": [1]}, "compress": {"bits": 0, "topk": 1.0},
              "pipeline": {"schedule": "gpipe"}},
     ["star.device_blocks", "star.rounds"]),
    ("line", {"unfreeze": {"every": 2}, "pipeline": {"partition": [1, 1], "profile": "p.yaml"}}, []),
    ("single", {"pipeline": {"partition": [30], "schedule": "gpipe", "profile": "p.yaml"}, "star": {"alpha": 2.0}},
     ["pipeline.partition", "star.alpha"]),
    ("sfl", {"pipeline": {"schedule": "gpipe", "early_stop": True}, "unfreeze": {"initial": 2},
             "star": {"schedule": "fifo", "profile": "p.yaml", "error_budget": 0.5}, "compress": {"topk": 0.5}},
     ["pipeline.schedule", "star.error_budget", "unfreeze.initial"]),
    ("sft", {"pipeline": {"partition": [1, 2]}, "star": {"schedule": "fifo", "error_budget": 0.5}},
     ["pipeline.partition", "star.schedule"]),
])
def test_unused_keys_per_mode(mode, given, unused):
    raw = {**given, "pipeline": {**given.get("pipeline", {}), "mode": mode}, "run": {"steps": 1}}
    assert C.unused_keys(raw, C.from_dict(raw)) == unused


def test_unused_keys_are_warned_about_once(tmp_path, caplog):
    path = tmp_path / "c.yaml"
    path.write_text("pipeline:\n  mode: ring\nstar:\n  rounds: 2\n")
    with caplog.at_level("WARNING", logger="ringada.config"):
        C.load(path, ["star.device_blocks=[1]"])
    assert [r.getMessage() for r in caplog.records] == [
        "star.device_blocks, star.rounds are not used by pipeline.mode='ring'; they are ignored"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="ringada.config"):
        C.load(path, ["pipeline.mode=sfl", "run.steps=2", "star.local_steps=1"])
    assert not caplog.records


def test_compress_settings_that_load():
    cfg = C.load(None, ["run.steps=1", "pipeline.mode=sft", "compress.bits=3", "compress.grad_bits=null",
                        "compress.hadamard=64", "compress.outliers=1e-3", "compress.rounding=nearest",
                        "compress.error_feedback=true", "compress.eval=codec", "compress.lossless=zlib"])
    assert cfg.compress.grad_bits is None and cfg.compress.outliers == 0.001 and cfg.compress.scale == "group"
    ring = C.load(None, ["pipeline.mode=ring", "pipeline.compress=true", "compress.bits=8", "compress.grad_bits=0"])
    assert ring.pipeline.compress and C.unused_keys({"compress": {"bits": 8}}, ring) == []
    assert C.Config().compress == C.CompressConfig() and C.Config().pipeline.compress is False  # nothing by default


def test_hadamard_block_must_tile_the_hidden_size():
    cfg = C.load(None, ["run.steps=1", "pipeline.mode=sft", "compress.bits=4", "compress.hadamard=64"])
    C.check_compress_against_model(cfg, 576)
    with pytest.raises(C.ConfigError, match="hadamard: got 64, which does not divide the model's hidden size 48; "
                                            "use a power of two that does, e.g. 16"):
        C.check_compress_against_model(cfg, 48)
