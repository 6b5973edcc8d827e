"""Training curves beside the CSVs: TensorBoard event files always (``RUN/tensorboard/``), MLflow as well
when ``MLFLOW_TRACKING_URI`` is set (MLflow's own switch; ``pip install mlflow-skinny``).

The MLflow run is the training run: its id is kept in ``RUN/mlflow_run_id`` so that a resumed run goes on
logging into the same MLflow run; the config is logged as parameters once, with the config digest as a tag.
Rank 0 alone tracks. TensorBoard's events written after the checkpoint a run resumes from are dropped, as
the CSVs' rows are; MLflow keeps a metric's history, so a resumed run's steps appear there twice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

MLFLOW_RUN_ID = "mlflow_run_id"


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:6000]  # MLflow's limit on a parameter's value
    return out


class Tracking:
    """Scalars to TensorBoard (and MLflow); ``close(failed)`` flushes both."""

    def __init__(self, run: Path, cfg, start: int):
        from torch.utils.tensorboard import SummaryWriter

        uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        self.mlflow: Any = None
        if uri:
            try:
                import mlflow
            except ImportError:
                from .config import ConfigError

                raise ConfigError(
                    f"MLFLOW_TRACKING_URI is set ({uri}) but MLflow is not installed: "
                    "pip install mlflow-skinny, or unset MLFLOW_TRACKING_URI"
                ) from None
            mlflow.set_tracking_uri(uri)
            id_file = run / MLFLOW_RUN_ID
            if id_file.exists():
                mlflow.start_run(run_id=id_file.read_text().strip())
            else:
                active = mlflow.start_run(run_name=run.name)
                id_file.write_text(active.info.run_id + "\n")
                mlflow.log_params(_flat(cfg.to_dict()))
                mlflow.set_tags({"config_digest": cfg.digest(), "run_folder": str(run.resolve())})
            self.mlflow = mlflow
        self.tb = SummaryWriter(log_dir=str(run / "tensorboard"), purge_step=start + 1 if start else None)

    def scalar(self, name: str, value: float, step: int) -> None:
        self.tb.add_scalar(name, value, step)
        if self.mlflow is not None:
            self.mlflow.log_metric(name, float(value), step=step, synchronous=False)

    def close(self, failed: bool = False) -> None:
        self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run(status="FAILED" if failed else "FINISHED")  # waits for the queued metrics
            self.mlflow = None
