"""Generic training machinery: optimizer, train state with EMA, sharding, checkpoints, the loop.

Stage code (losses and steps per network) builds on these; see `loop.train_loop`.
"""

from jaxsd.training.checkpoint import Checkpointer, Restored, restore_path
from jaxsd.training.loop import LoopResult, PeriodicCallback, train_loop
from jaxsd.training.metrics import MetricWriter, ProgressBar
from jaxsd.training.optimizer import make_optimizer, make_schedule
from jaxsd.training.sharding import (
    compile_train_step,
    init_sharded,
    make_global_batch,
    make_mesh,
    shard_tree,
    tree_shardings,
)
from jaxsd.training.train_state import TrainState, ema_decay_rate, make_train_step

__all__ = [
    "Checkpointer",
    "Restored",
    "restore_path",
    "LoopResult",
    "PeriodicCallback",
    "train_loop",
    "MetricWriter",
    "ProgressBar",
    "make_optimizer",
    "make_schedule",
    "compile_train_step",
    "init_sharded",
    "make_global_batch",
    "make_mesh",
    "shard_tree",
    "tree_shardings",
    "TrainState",
    "ema_decay_rate",
    "make_train_step",
]
