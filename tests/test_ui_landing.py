"""`stridelab ui` prints the page to open: the sweeps' runs in MLflow's model-training view.

MLflow 3.x opens an experiment in its GenAI (traces) view unless the URL says ``workflowType=machine_learning``;
a sweep has runs, metrics and plots and no traces, so the printed URL must carry it (checked in a browser on
MLflow 3.17: without it the page shows an empty traces overview).
"""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from jobs.ui import landing_url
from search.tracking import DEFAULT_EXPERIMENT


def test_landing_url_opens_the_sweep_experiment_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment("other")
    exp_id = client.create_experiment(DEFAULT_EXPERIMENT)
    assert landing_url(uri, "127.0.0.1", 5000) == (
        f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning")


def test_landing_url_of_a_new_store_is_the_experiment_list_and_creates_nothing(tmp_path):
    db = tmp_path / "new" / "mlflow.db"
    url = landing_url(f"sqlite:///{db}", "0.0.0.0", 5001)
    assert url == "http://127.0.0.1:5001/#/experiments?workflowType=machine_learning"  # 0.0.0.0 is not browsable
    assert not db.parent.exists()
