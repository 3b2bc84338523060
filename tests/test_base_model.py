"""A run made with one build of the built-in model is never resumed or read with another."""

import pytest

from flexmoe.federated.artifacts import RunArtifacts
from flexmoe.federated.base_model import (
    BaseModelMismatchError,
    check_base_model,
    record_base_model,
)
from flexmoe.federated.config import RunConfig
from flexmoe.federated.run import prepare_run_dir
from flexmoe.models.default_model import default_model_dir


def _run_dir(tmp_path, source: str):
    cfg = RunConfig()  # model = "default"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.resolved.json").write_text(cfg.to_json())
    record_base_model(run_dir, cfg, source)
    return run_dir, cfg


def test_a_run_of_another_build_is_refused_on_resume_and_when_read(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXMOE_HOME", str(tmp_path / "home"))
    old_build = str(tmp_path / "home" / "models" / "flexmoe-tiny-moe-000000000000")
    run_dir, _ = _run_dir(tmp_path, old_build)
    with pytest.raises(BaseModelMismatchError, match="flexmoe-tiny-moe-000000000000, but this"):
        prepare_run_dir(run_dir, None, resume=True)
    with pytest.raises(BaseModelMismatchError, match="start a new run"):
        RunArtifacts(run_dir)


def test_a_run_of_this_build_passes(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXMOE_HOME", str(tmp_path / "home"))
    run_dir, cfg = _run_dir(tmp_path, str(default_model_dir()))
    check_base_model(run_dir, cfg)
    assert prepare_run_dir(run_dir, None, resume=True).hash() == cfg.hash()


def test_a_renamed_run_directory_is_refused_on_resume(tmp_path, monkeypatch):
    from flexmoe.federated.run import RunDirError

    monkeypatch.setenv("FLEXMOE_HOME", str(tmp_path / "home"))
    run_dir, _ = _run_dir(tmp_path, str(default_model_dir()))
    (run_dir / "state" / "run" / "flex").mkdir(parents=True)  # filed under the name "run"
    prepare_run_dir(run_dir, None, resume=True)
    renamed = run_dir.rename(tmp_path / "renamed")
    with pytest.raises(RunDirError, match="filed under run, not under this directory's name"):
        prepare_run_dir(renamed, None, resume=True)
