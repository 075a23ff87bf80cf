"""The MLflow run logger (mgrpo_cli/reporting/tracking.py) against a SQLite tracking store in a temporary folder."""
import time

import mlflow

from mgrpo_cli.reporting.tracking import RunLogger


def test_sampled_completions_table_appends_and_reads_back(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = RunLogger(uri, "tables", "run", params={"grpo": {"lr": 1e-4}}, artifacts=tmp_path / "mlartifacts",
                       folder=tmp_path / "run")
    row = {"step": 1, "layer": 1, "question": "1+2", "gold": "3", "turns": [], "completion": "3 \\boxed{3}",
           "reward": 1.0, "advantage": 0.5}
    logger.log_table([row, {**row, "completion": "4", "reward": None, "advantage": -0.5}], "samples.json")
    logger.log_table([{**row, "step": 2, "layer": 2, "turns": [["4", "Wait."]]}], "samples.json")
    logger.end()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("tables")
    table = mlflow.load_table("samples.json", run_ids=[logger.run_id])
    assert list(table.columns) == list(row)
    assert table["step"].tolist() == [1, 1, 2] and table["layer"].tolist() == [1, 1, 2]
    assert table["completion"].tolist() == ["3 \\boxed{3}", "4", "3 \\boxed{3}"]
    assert table["advantage"].tolist() == [0.5, -0.5, 0.5] and table["reward"].isna().tolist() == [False, True, False]
    assert table["turns"].tolist()[2] == [["4", "Wait."]]
    run = mlflow.get_run(logger.run_id)
    assert "samples.json" in run.data.tags.get("mlflow.loggedArtifacts", "")  # the UI lists it as a table


def test_the_command_ends_the_run_and_a_resumed_run_reopens_it(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    params = {"trainer": {"max_steps": 10}}
    logger = RunLogger(uri, "ends", "run", params=params, artifacts=tmp_path / "mlartifacts",
                       folder=tmp_path / "run")
    run_id = logger.run_id
    logger.logger.finalize("success")  # what Lightning calls at the end of every validate/fit
    assert logger.outbox.wait_sent(10) and client.get_run(run_id).info.status == "RUNNING"
    logger.end("KILLED")
    killed = client.get_run(run_id).info
    assert killed.status == "KILLED" and killed.end_time >= killed.start_time

    again = RunLogger(uri, "ends", "run", params={"trainer": {"max_steps": 20}}, artifacts=tmp_path / "mlartifacts",
                      tags={"overrides": "resume=x trainer.max_steps=20"}, run_id=run_id, folder=tmp_path / "run")
    again.logger.log_hyperparams({"trainer/max_steps": 20})  # Lightning's own params call: a changed value is skipped
    assert again.outbox.wait_sent(10)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.params["trainer.max_steps"] == "10"
    assert run.data.tags["resumes"] == "1" and run.data.tags["resume.1.overrides"] == "resume=x trainer.max_steps=20"
    time.sleep(0.01)  # MLflow's times are in milliseconds: the second leg ends strictly later than the first
    before_end = int(time.time() * 1000)
    again.end("FAILED", "UserError: trainer.max_nonfinite_steps=3: ...")
    after_end = int(time.time() * 1000)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "UserError: trainer.max_nonfinite_steps=3: ..."
    # the run's times span every leg: the first leg's start, the last leg's end (not the KILLED leg's)
    assert run.info.start_time == killed.start_time
    assert before_end <= run.info.end_time <= after_end and run.info.end_time > killed.end_time
    assert len(client.search_runs([run.info.experiment_id])) == 1
