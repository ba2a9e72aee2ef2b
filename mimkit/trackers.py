"""Optional experiment trackers (Weights & Biases, MLflow) behind one small hook: ``open_tracker(name, run_dir,
config)`` returns an object with ``log(values: dict, step: int)`` and ``close()``. Off by default; the engine's
metrics writer sends every scalar it writes to metrics.jsonl and TensorBoard to the tracker too.

Each tracker is used through its own package and honours its own settings (``WANDB_MODE=offline``,
``WANDB_PROJECT``, ``MLFLOW_TRACKING_URI``, ...); mimkit adds nothing to them but the run name and the config.
"""
from pathlib import Path

from .errors import ConfigError

TRACKERS = ("none", "wandb", "mlflow")


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict):
        import os
        import wandb
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mimkit"), name=Path(run_dir).name,
                              dir=str(run_dir), config=config)

    def log(self, values: dict, step: int):
        self.run.log(values, step=step)

    def close(self):
        self.run.finish()


class MlflowTracker:
    def __init__(self, run_dir: Path, config: dict):
        import mlflow
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=Path(run_dir).name)
        mlflow.log_params({k: str(v)[:250] for k, v in config.items()})  # MLflow caps a value's length

    def log(self, values: dict, step: int):
        self.mlflow.log_metrics(values, step=step)

    def close(self):
        self.mlflow.end_run()


def open_tracker(name: str, run_dir, config: dict):
    """The tracker ``--tracker`` names, started for this run, or None for 'none'."""
    if name in ("", "none"):
        return None
    kinds = {"wandb": WandbTracker, "mlflow": MlflowTracker}
    if name not in kinds:
        raise ConfigError(f"--tracker must be one of {', '.join(TRACKERS)}; got {name!r}")
    try:
        return kinds[name](Path(run_dir), config)
    except ImportError:
        raise ConfigError(f"--tracker {name} needs the {name} package: pip install {name}") from None
