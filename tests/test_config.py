from pathlib import Path

import pytest

from spd_ray.config import ConfigError, SPDConfig, load_config, save_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


def test_defaults_are_the_papers():
    cfg = SPDConfig()
    assert cfg.subspace.rank_mode == "half" and cfg.subspace.center
    assert (cfg.generation.temperature, cfg.generation.top_p, cfg.generation.max_new_tokens) == (0.7, 0.9, 256)
    f = cfg.finetune
    assert (f.method, f.lora_r, f.lora_alpha, f.lora_dropout) == ("lora", 8, 8, 0.05)
    assert (f.lr, f.weight_decay, f.epochs, f.batch_size, f.max_length, f.seed) == (1e-5, 0.01, 5, 4, 256, 42)
    assert cfg.task.n_calibration == 50 and cfg.calibration.layers is None


def test_overrides_are_typed():
    cfg = load_config(None, ["subspace.rank_mode=fixed", "subspace.rank=32", "finetune.lr=3e-4",
                             "calibration.layers=[0,-1]", "generation.project=false"])
    assert cfg.subspace.rank == 32 and cfg.finetune.lr == 3e-4
    assert cfg.calibration.layers == [0, -1] and cfg.generation.project is False


@pytest.mark.parametrize("override, words", [
    ("subspace.rnk=3", ["subspace.rnk", "rank_mode", "energy"]),
    ("nosection.x=1", ["nosection", "calibration", "finetune"]),
    ("subspace.rank=abc", ["subspace.rank", "int"]),
    ("subspace.mode=kv", ["subspace.mode", "k_only"]),
    ("finetune.epochs=[1]", ["finetune.epochs", "float"]),
    ("justakey", ["section.key=value"]),
])
def test_bad_overrides_name_the_key_and_the_fix(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    for word in words:
        assert word in str(err.value)


def test_yaml_unknown_key_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="finetune.learning_rate.*valid keys.*lr"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_a_config_file_includes_its_base_and_keeps_only_the_differences(tmp_path):
    (tmp_path / "variants").mkdir()
    (tmp_path / "root.yaml").write_text("finetune: {lr: 3.0e-4, epochs: 2}\nrun: {name: root}\n")
    (tmp_path / "mid.yaml").write_text("base: root.yaml\nfinetune: {epochs: 3, batch_size: 2}\n")
    leaf = tmp_path / "variants" / "leaf.yaml"
    leaf.write_text("base: ../mid.yaml\nfinetune: {batch_size: 1}\n")  # relative to this file
    cfg = load_config(leaf, ["finetune.epochs=4"])
    assert (cfg.finetune.lr, cfg.finetune.epochs, cfg.finetune.batch_size) == (3e-4, 4, 1)
    assert cfg.run.name == "root" and cfg.finetune.lora_r == SPDConfig().finetune.lora_r  # merged, not replaced
    assert load_config(tmp_path / "mid.yaml").finetune.epochs == 3


@pytest.mark.parametrize("files, message", [
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, r"in a cycle \(.*a.yaml -> .*b.yaml -> .*a.yaml\)"),
    ({"a.yaml": "base: a.yaml\n"}, "in a cycle"),
    ({"a.yaml": "base: missing.yaml\nrun: {}\n"}, r"base: missing.yaml names no file .*relative to the file"),
    ({"a.yaml": "base: [b.yaml]\n"}, "must be the path of another config file"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "finetune: {learning_rate: 1}\n"}, "finetune.learning_rate"),
])
def test_a_bad_base_is_refused_with_the_fix(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "a.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_a_span_rule_is_one_of_the_cores_and_an_unknown_one_lists_them():
    from spd_ray.core.spans import SPAN_RULES

    for rule in ("final_number", "answer_letter", "asserts"):
        cfg = load_config(None, [f"task.files.spans.rule={rule}"])
        assert rule in SPAN_RULES and cfg.task.files.spans.mode == "rule"
    with pytest.raises(ConfigError, match=r"task.files.spans.rule='bogus' is not a span rule; "
                                          r"valid rules: \['final_number', 'answer_letter', "
                                          r"'asserts'\]"):
        load_config(None, ["task.files.spans.rule=bogus"])


@pytest.mark.parametrize("overrides, message", [
    (["generation.backend=vllm"], r"gpus_per_replica=0.0: each vLLM engine takes whole GPUs"),
    (["generation.backend=vllm", "generation.gpus_per_replica=0.5"], r"set generation.gpus_per_replica=1"),
    (["generation.backend=vllm", "generation.gpus_per_replica=1", "generation.tensor_parallel_size=2"],
     r"set generation.gpus_per_replica=2"),
    (["generation.backend=vllm", "generation.gpus_per_replica=1", "generation.gpu_memory_utilization=1.5"],
     r"in \(0, 1\]"),
])
def test_vllm_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_fractions_of_a_gpu_are_fine_on_the_hf_backend():
    load_config(None, ["generation.gpus_per_replica=0.5"])


def test_an_unknown_scorer_lists_the_built_in_ones():
    with pytest.raises(ConfigError, match=r"task.files.split_scorers.test='exactly'; valid "
                                          r"scorers: \['exact', 'normalized', 'number', 'choice', "
                                          r"'regex', 'asserts', 'nll'\] or module:function"):
        load_config(None, ["task.files.eval={test: t.jsonl}",
                           "task.files.split_scorers={test: exactly}"])


def test_the_config_imports_no_torch_and_nothing_else_of_spd_ray():
    import json
    import subprocess
    import sys

    code = "import json, sys\nimport spd_ray.config\nprint(json.dumps(sorted(m for m in " \
           "sys.modules if m.split('.')[0] in ('torch', 'spd_ray'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == ["spd_ray", "spd_ray.config"]
