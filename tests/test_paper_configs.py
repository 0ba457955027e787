"""The shipped configs load; the paper's (configs/paper) hold its recipe and their tasks load from
local files in the hub schemas, without a model."""

from pathlib import Path

import pytest
import yaml

from spd_ray.config import load_config
from spd_ray.tasks.task import load_task
from tests.hub_files import write_hub_files

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted(ROOT.glob("configs/paper/*.yaml"))
ONE_GPU = sorted(ROOT.glob("configs/paper/one-gpu/*.yaml"))
CONFIGS = sorted(ROOT.glob("configs/*.yaml")) + PAPER + ONE_GPU  # configs/compare: comparison configs
# what makes a paper config a one-GPU one (the 0.5B configs are one-GPU configs already)
ONE_GPU_SETTINGS = ["calibration.num_workers=1", "finetune.num_workers=1", "finetune.zero_stage=0",
                    "finetune.gradient_checkpointing=true"]
BACKBONES = {"qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
             "qwen3-4b": "Qwen/Qwen3-4B-Instruct-2507", "llama3.1-8b": "meta-llama/Llama-3.1-8B-Instruct"}
DOMAINS = {"gsm8k": "math", "mmlu": "mcq", "mbpp": "code"}
# calibration examples + training prompts: all of GSM8K train and of MBPP train + validation,
# 2,000 MMLU auxiliary_train prompts (the paper's counts)
POOL = {"math": 7473, "mcq": 2050, "code": 464}


def test_there_is_one_paper_config_per_backbone_and_benchmark():
    assert {p.stem for p in PAPER} == {f"{b}-{d}" for b in BACKBONES for d in DOMAINS}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS])
def test_config_loads(path):
    load_config(path)


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_config_holds_the_papers_recipe(path):
    cfg = load_config(path)
    backbone, benchmark = path.stem.rsplit("-", 1)
    assert (cfg.model.path, cfg.model.dtype, cfg.model.device) == (BACKBONES[backbone], "bfloat16", "cuda")
    t = cfg.task
    assert (t.source, t.domain, t.seed, t.n_calibration) == ("hub", DOMAINS[benchmark], 42, 50)
    assert t.n_calibration + t.n_train_prompts == POOL[t.domain]
    g, f = cfg.generation, cfg.finetune
    assert (g.temperature, g.top_p, g.max_new_tokens) == (0.7, 0.9, 256)
    assert g.replicas_min < g.replicas_max
    assert (f.method, f.lora_r, f.lora_alpha, f.lora_dropout, f.lr, f.weight_decay, f.epochs, f.batch_size,
            f.max_length) == ("lora", 8, 8, 0.05, 1e-5, 0.01, 5, 4, 256)
    assert f.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    # a GPU user's defaults: ZeRO-3 over one node's GPUs (PACK), a 0.5B LoRA model on one GPU
    # without ZeRO
    small = backbone == "qwen2.5-0.5b"
    assert f.use_gpu and f.zero_stage == (0 if small else 3) and f.placement == "PACK"
    assert (f.num_workers, cfg.calibration.num_workers) == ((1, 1) if small else (4, 2))
    assert cfg.calibration.gpus_per_worker == 1
    assert g.gpus_per_replica == (0.25 if small else 1)  # four 0.5B replicas share a GPU
    # stated in the file, not inherited from a default that could change
    assert cfg.evaluation.sandbox == "isolated" and "sandbox: isolated" in path.read_text()


def test_each_large_paper_config_has_a_one_gpu_variant_that_fits_one_gpu():
    from spd_ray.stages.preflight import Capacity, check_resources

    one_gpu = Capacity(cpus=16, gpus=1, nodes=((16, 1),))
    assert {p.stem for p in ONE_GPU} == {p.stem for p in PAPER if not p.stem.startswith("qwen2.5-0.5b")}
    for path in ONE_GPU + [p for p in PAPER if p.stem.startswith("qwen2.5-0.5b")]:
        check_resources(load_config(path), one_gpu)
    for path in ONE_GPU:  # the paper config of the same name (its base), but for the one-GPU settings
        assert yaml.safe_load(path.read_text())["base"] == f"../{path.name}"
        paper = load_config(ROOT / "configs/paper" / path.name, ONE_GPU_SETTINGS)
        paper.run.name += "-1gpu"
        assert load_config(path) == paper
        assert "docs/method.md" in path.read_text()  # the method's description, which exists
    assert (ROOT / "docs/method.md").is_file()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_hub_files(tmp_path_factory.mktemp("hub"))


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_task_loads_from_local_files(path, data_dir):
    # the local files are a few rows each: fewer calibration examples and prompts, every eval split
    cfg = load_config(path, [f"task.data_dir={data_dir}", "task.n_calibration=2", "task.n_train_prompts=3"])
    task = load_task(cfg)
    assert len(task.calibration) == 2 and len(task.train_prompts) == 3
    assert {it.domain for it in task.calibration} == {cfg.task.domain}
    domains = cfg.evaluation.domains or [cfg.task.domain]
    assert list(task.eval_splits) == [f"{d}/{s}" for d in domains for s in ("test", "transfer")]
    assert all(task.eval_splits.values())
