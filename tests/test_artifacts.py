"""The run directory and the experiment store: what is reused, what is redone, what is kept."""

import json

from spd_ray.artifacts import DEPENDS_ON, RunDir
from spd_ray.config import load_config


def _cfg(tmp_path, name, *overrides):
    return load_config(None, [f"run.output_dir={tmp_path / 'runs'}", f"run.name={name}", *overrides])


def _make(run, name, produce, cfg=None, **kw):
    """RunDir.stage as the pipeline uses it: the body runs only when the artifact is to make."""
    with run.stage(name, cfg, **kw) as art:
        if art.todo:
            produce(art.path)
    return art.path


def _writer(calls, text):
    def produce(out):
        calls.append(out.name)
        out.write_text(text)
    return produce


def test_store_shares_artifacts_whose_sections_agree(tmp_path):
    store, calls = tmp_path / "store", []
    psr = RunDir(_cfg(tmp_path, "psr", "generation.project=false", "generation.top_p=1.0"), store)
    spd = RunDir(_cfg(tmp_path, "spd"), store)
    full = RunDir(_cfg(tmp_path, "full", "task.calibration_loss=full", "evaluation.project=true"), store)
    a = _make(psr, "eval_base.json", _writer(calls, "base"))
    b = _make(spd, "eval_base.json", _writer(calls, "other"))
    c = _make(full, "eval_base.json", _writer(calls, "other"))
    assert a == b == c and [c.split("-")[0] for c in calls] == ["eval_base.json.partial"]  # the base is evaluated once
    assert (spd.path / "eval_base.json").read_text() == "base"  # linked from the run directory
    _make(spd, "generations", _writer(calls, "projected"))
    _make(psr, "generations", _writer(calls, "plain"))
    assert len(calls) == 3  # the generation config differs: two corpora
    assert _make(spd, "subspace", _writer(calls, "s")) != _make(full, "subspace", _writer(calls, "f"))


def test_only_a_random_subspace_depends_on_the_seed(tmp_path):
    gradient = [RunDir(_cfg(tmp_path, f"g{seed}", f"subspace.random_seed={seed}")) for seed in (1, 2)]
    random = [RunDir(_cfg(tmp_path, f"r{seed}", "subspace.kind=random", f"subspace.random_seed={seed}"))
              for seed in (1, 2)]
    for name in ("subspace", "eval_projected.json"):  # stage 1 runs once for all seeds of a comparison
        assert gradient[0].key(name) == gradient[1].key(name)
        assert random[0].key(name) != random[1].key(name)


def test_round_artifacts_are_keyed_by_the_round_model(tmp_path):
    run, calls = RunDir(_cfg(tmp_path, "it")), []
    first = _make(run, "model", _writer(calls, "m1"))
    round2 = load_config(None, [f"run.output_dir={tmp_path / 'runs'}", "run.name=it", f"model.path={first}"])
    second = _make(run, "round2/model", _writer(calls, "m2"), round2)
    assert second == run.path / "round2" / "model" and second.read_text() == "m2"
    assert run.key("model") != run.key("round2/model", round2)
    assert _make(run, "round2/model", _writer(calls, "again"), round2).read_text() == "m2"
    assert [c.split("-")[0] for c in calls] == ["model.partial"] * 2  # written aside, renamed when complete


def test_crashed_stage_is_redone_and_a_changed_config_keeps_the_old_artifact(tmp_path):
    store = tmp_path / "store"
    run = RunDir(_cfg(tmp_path, "a"), store)

    def crash(out):
        out.write_text("half")
        raise RuntimeError("worker lost")

    try:
        _make(run, "corpus.json", crash)
    except RuntimeError:
        pass
    calls = []
    out = _make(run, "corpus.json", _writer(calls, "whole"))
    assert out.read_text() == "whole" and [c.split("-")[0] for c in calls] == ["corpus.json.partial"]
    local = RunDir(_cfg(tmp_path, "b"))  # no store: the run directory holds the artifact
    _make(local, "eval_spd.json", _writer(calls, "v1"))
    changed = RunDir(_cfg(tmp_path, "b", "finetune.lr=0.5"))
    _make(changed, "eval_spd.json", _writer(calls, "v2"))
    kept = [p.name for p in changed.path.iterdir() if p.name.startswith("eval_spd.json.")]
    assert len(kept) == 1 and (changed.path / kept[0]).read_text() == "v1"


def test_resumable_state_is_keyed_like_its_artifact(tmp_path):
    # a changed section must not resume (and ship) the checkpoints of another config's run
    run = RunDir(_cfg(tmp_path, "spd"))
    same = RunDir(_cfg(tmp_path, "spd"))
    assert run.resume_dir("model") == same.resume_dir("model")
    changes = {"model": "model.trust_remote_code=true", "task": "task.seed=1",
               "calibration": "calibration.batch_size=3", "subspace": "subspace.energy=0.9",
               "generation": "generation.temperature=0.5", "finetune": "finetune.lr=0.5"}
    assert set(changes) == set(DEPENDS_ON["model"])
    for section, override in changes.items():
        changed = RunDir(_cfg(tmp_path, "spd", override))
        assert changed.resume_dir("model") != run.resume_dir("model"), section
    assert RunDir(_cfg(tmp_path, "spd", "evaluation.max_new_tokens=3")).resume_dir("model") == run.resume_dir("model")
    store = RunDir(_cfg(tmp_path, "spd"), tmp_path / "store").resume_dir("round2/model")
    assert store.parent.parent == tmp_path / "store" and store.name.startswith("model.resume-")


def _folder_writer(calls):
    def produce(out):
        calls.append(out.name)
        out.mkdir()
        (out / "part-0.parquet").write_bytes(b"PAR1" + b"x" * 1000 + b"PAR1")
        (out / "meta.json").write_text("{}")
    return produce


def test_a_damaged_artifact_is_named_and_made_again(tmp_path, capsys):
    for store in (None, tmp_path / "store"):  # in the run directory and in a shared store
        calls = []
        run = RunDir(_cfg(tmp_path, f"d{store is None}"), store)
        out = _make(run, "generations", _folder_writer(calls))
        assert _make(run, "generations", _folder_writer(calls)) == out and len(calls) == 1
        part = out / "part-0.parquet"
        part.write_bytes(part.read_bytes()[:500])  # truncated, as by a full disk or a lost node
        again = _make(RunDir(_cfg(tmp_path, f"d{store is None}"), store), "generations", _folder_writer(calls))
        assert len(calls) == 2 and (again / "part-0.parquet").stat().st_size == 1008
        assert f"{part} is damaged (500 bytes, 1008 recorded); making it again" in capsys.readouterr().out
        (again / "meta.json").write_text("[]")  # same size, other bytes
        _make(RunDir(_cfg(tmp_path, f"d{store is None}"), store), "generations", _folder_writer(calls))
        assert len(calls) == 3 and "checksum differs" in capsys.readouterr().out


def test_a_damaged_manifest_does_not_block_a_rerun(tmp_path, capsys):
    calls = []
    run = RunDir(_cfg(tmp_path, "m"))
    _make(run, "corpus.json", _writer(calls, "c"))
    manifest = run.path / "manifest.json"
    manifest.write_text(manifest.read_text()[:20])  # truncated
    again = RunDir(_cfg(tmp_path, "m"))
    assert "manifest.json is damaged" in capsys.readouterr().out
    assert _make(again, "corpus.json", _writer(calls, "c2")).read_text() == "c2" and len(calls) == 2
    assert json.loads(manifest.read_text())["corpus.json"]["content"]  # a whole manifest again
    assert list(run.path.glob("manifest.json.damaged-*"))  # the damaged one kept for a look


def test_a_kill_while_producing_leaves_the_old_state(tmp_path):
    calls = []
    run = RunDir(_cfg(tmp_path, "k"))

    def killed(out):
        out.write_text("half")
        raise KeyboardInterrupt  # as a SIGINT or a lost driver mid-write

    try:
        _make(run, "corpus.json", killed)
    except KeyboardInterrupt:
        pass
    assert not (run.path / "corpus.json").exists() and "corpus.json" not in run.manifest
    assert _make(RunDir(_cfg(tmp_path, "k")), "corpus.json", _writer(calls, "whole")).read_text() == "whole"


def test_retry_and_checkpoint_settings_change_no_artifact(tmp_path):
    run = RunDir(_cfg(tmp_path, "r"))
    other = RunDir(_cfg(tmp_path, "r", "calibration.max_failures=0", "finetune.max_failures=9",
                        "finetune.checkpoint_every_steps=5", "finetune.checkpoint_every_s=60"))
    assert all(run.key(name) == other.key(name) for name in DEPENDS_ON)


def test_an_edited_data_file_makes_the_artifacts_that_read_it_again(tmp_path):
    # same config, other content: each artifact is keyed by the parts of the data it is made from
    data = {"calibration": "c1", "train": "t1", "eval": "e1"}
    run = RunDir(_cfg(tmp_path, "spd"), data=data)
    calls = []
    _make(run, "subspace", _writer(calls, "made from c1"))
    edited = RunDir(_cfg(tmp_path, "spd"), data={**data, "calibration": "c2"})
    _make(edited, "subspace", _writer(calls, "made from c2"))
    assert calls == ["subspace.partial-" + run.key("subspace"), "subspace.partial-" + edited.key("subspace")]
    assert (edited.path / "subspace").read_text() == "made from c2"
    assert edited.key("eval_base.json") == run.key("eval_base.json")  # the base model's scores read no calibration
    assert edited.key("model") != run.key("model")
    new_eval = RunDir(_cfg(tmp_path, "spd"), data={**data, "eval": "e2"})
    assert new_eval.key("eval_base.json") != run.key("eval_base.json")
    assert new_eval.key("model") == run.key("model")


def test_what_was_made_from_a_remade_artifact_is_kept_only_if_it_came_out_the_same(tmp_path, capsys):
    for store in (None, tmp_path / "store"):
        run, calls = RunDir(_cfg(tmp_path, f"dep{store is None}"), store), []
        _make(run, "generations", _writer([], "g1"))
        _make(run, "model", _writer(calls, "trained on g1"), inputs=["generations"])
        gen = run.path / "generations"
        gen.write_text("g1 truncat")  # damaged: remade below with the same content
        again = RunDir(_cfg(tmp_path, f"dep{store is None}"), store)
        _make(again, "generations", _writer([], "g1"))
        assert "made again, with the content recorded before: what was made from it is kept" in \
            capsys.readouterr().out
        assert _make(again, "model", _writer(calls, "x"), inputs=["generations"]).read_text() == "trained on g1"
        gen.write_text("g1 truncat")  # damaged again, and this time remade with other content
        third = RunDir(_cfg(tmp_path, f"dep{store is None}"), store)
        _make(third, "generations", _writer([], "g2"))
        assert "with other content than recorded before: what was made from it is made again" in \
            capsys.readouterr().out
        model = _make(third, "model", _writer(calls, "trained on g2"), inputs=["generations"])
        assert model.read_text() == "trained on g2" and len(calls) == 2
        assert "was made from another generations than this run's" in capsys.readouterr().out
