"""jobs/diagnose.py: the Table 3 check refuses what it cannot score before any Ray work."""

from pathlib import Path

import pytest

from jobs import diagnose

ROOT = Path(__file__).resolve().parents[1]


def test_prompts_without_answers_are_refused_before_any_work(tmp_path, capsys):
    code = diagnose.main(["--config", str(ROOT / "configs/examples/units.yaml"), f"run.output_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "come without answers" in err and "no corpus can be scored" in err
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


def test_bad_seed_list_or_override_is_a_clear_error(tmp_path, capsys):
    assert diagnose.main([f"run.output_dir={tmp_path}", "generation.temprature=0.3"]) == 2
    assert "temprature" in capsys.readouterr().err


def test_arms_files_are_checked_before_any_work(tmp_path, capsys):
    bad = tmp_path / "arms.yaml"
    for text, fact in [("rank32: subspace.rank=32", "list of overrides"),
                       ("unprojected: [subspace.beta=0.5]", "reference every run has"),
                       ("soft: [subspace.beta=1.5]", "subspace.beta=1.5")]:
        bad.write_text(text)
        assert diagnose.main(["--arms", str(bad), f"run.output_dir={tmp_path / 'runs'}"]) == 2
        assert fact in capsys.readouterr().err
    bad.write_text("soft: [subspace.beta=0.5]")
    assert diagnose.main(["--arms", str(bad), "--control", "activation", f"run.output_dir={tmp_path}"]) == 2
    assert "--control activation is not an arm" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_arms_share_their_subspaces_and_noise_and_are_measured_alike(local_ray, tmp_path):
    """The default arm, a soft projection of the same subspace, the activation subspace (the
    control) and the unprojected reference: two stage 1s in all, the same prompts and seeds, and
    the gold answer's log-probability of the reference equal to the plain model's."""
    import json

    from spd_ray.config import load_config
    from spd_ray.core.modeling import load_model, load_tokenizer
    from spd_ray.tasks.evaluation import answer_logprobs
    from spd_ray.tasks.task import load_task

    arms = tmp_path / "arms.yaml"
    arms.write_text("projected: []\nsoft: [subspace.beta=0.5]\nactivation: [subspace.kind=activation]\n")
    small = ["task.n_calibration=16", "task.n_train_prompts=12", "generation.max_new_tokens=24",
             "calibration.num_workers=1", "generation.replicas_max=1", f"run.output_dir={tmp_path}"]
    assert diagnose.main(["--seeds", "3", "4", "--arms", str(arms), "--control", "activation",
                          "--energy-prompts", "8", "--probe-prompts", "6", *small]) == 0
    out = tmp_path / "testbed-diagnose"
    result = json.loads((out / "diagnose.json").read_text())
    rows = {r["arm"]: r for r in result["rows"]}
    assert list(rows) == ["projected", "soft", "activation", "unprojected"]
    assert all(r["seeds"] == 2 and r["items"] == 12 for r in rows.values())
    diff = rows["projected"]["vs_unprojected"]
    assert diff["mean"] == pytest.approx(rows["projected"]["accuracy"]["mean"] - rows["unprojected"]["accuracy"]["mean"])
    assert "vs_activation" in rows["projected"] and 0 <= rows["soft"]["changed"] <= 1
    assert len(list((out / "store").glob("*/subspace"))) == 2  # gradient (hard and soft) and activation
    assert set(rows["projected"]["energy"]) == {"L5.k", "L5.v", "L3.k", "L3.v"}  # the paper's layers of 6
    assert rows["soft"]["energy"] == rows["projected"]["energy"]  # one subspace, applied two ways
    assert rows["activation"]["energy"] != rows["projected"]["energy"] and rows["unprojected"]["energy"] is None
    # the reference's gold log-probability is the plain model's, after the answer marker
    cfg = load_config(ROOT / "configs/testbed.yaml", small)
    task = load_task(cfg)
    probes = task.train_items[:6]
    plain = answer_logprobs(load_model(cfg.model.path, device="cpu"), load_tokenizer(cfg.model.path),
                            [it.prompt + "#### " for it in probes], [it.gold for it in probes])
    assert rows["unprojected"]["gold_logprob"]["mean"] == pytest.approx(sum(lp for lp, _ in plain) / 6, rel=1e-4)
    assert rows["projected"]["gold_logprob_vs_unprojected"]["mean"] == pytest.approx(
        rows["projected"]["gold_logprob"]["mean"] - rows["unprojected"]["gold_logprob"]["mean"])
    for r in rows.values():
        assert 0 < r["samples"]["tokens"] <= 24 and 0 <= r["samples"]["stopped"] <= 1 and 0 <= r["samples"]["marked"] <= 1
    text = (out / "diagnose.md").read_text()
    assert "- projected - unprojected:" in text and "vs activation" in text
