"""Data-parallel pretraining through Ray Train.

``TorchTrainer`` starts one process per worker and joins them in a torch.distributed process
group (gloo on CPU, NCCL on GPU); each then runs the same ``trainers.pretrain`` loop, which
notices the process group, takes its rank's slice of every global batch and lets DDP average the
gradients. Rank 0 writes the checkpoints (resumable by any later run on the same directory, with
any number of workers: the data position is the step) and the final model and history.
"""

from __future__ import annotations

import json
from pathlib import Path

from chimera.checkpoint import atomic_write, save_model
from trainers.fit import History
from trainers.pretrain import PretrainPlan, pretrain
from trainers.store import TokenStore

HISTORY_FILE = "history.json"


def _worker_loop(config: dict) -> None:
    """Runs in every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    torch.set_num_threads(config["threads"])
    context = ray.train.get_context()
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    store = TokenStore.open(config["store_dir"], verify=False)
    model, result = pretrain(PretrainPlan.from_dict(config["plan"]), store,
                             config["checkpoint_dir"], device=device,
                             stop_after=config.get("stop_after"))
    if context.get_world_rank() == 0:
        out = Path(config["out"])
        save_model(model, out)
        record = {"step": result.step, "interrupted": result.interrupted,
                  "history": result.history.to_dict()}
        atomic_write(out / HISTORY_FILE, lambda tmp: Path(tmp).write_text(json.dumps(record)))


def pretrain_on_ray(plan: PretrainPlan, store_dir: str | Path, out: str | Path,
                    checkpoint_dir: str | Path, workers: int, use_gpu: bool = False,
                    threads_per_worker: int = 1, stop_after: int | None = None
                    ) -> tuple[int, History]:
    """Pretrain on ``workers`` Ray Train workers (Ray must be initialised). Writes the model to
    ``out`` and returns (steps reached, history). Paths must be visible to every worker."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = Path(out).resolve()
    config = {"plan": plan.to_dict(), "store_dir": str(Path(store_dir).resolve()),
              "checkpoint_dir": str(Path(checkpoint_dir).resolve()), "out": str(out),
              "use_gpu": use_gpu, "threads": threads_per_worker, "stop_after": stop_after}
    resources = {"CPU": threads_per_worker} | ({"GPU": 1} if use_gpu else {})
    trainer = TorchTrainer(
        _worker_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name="pretrain", storage_path=str(out / "ray-train")))
    trainer.fit()
    record = json.loads((out / HISTORY_FILE).read_text())
    return record["step"], History.from_dict(record["history"])
