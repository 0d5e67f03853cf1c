"""Training: `train(TrainConfig(...), method=...)` takes raw text (or a prepared dataset) to a
checkpointed model — pretraining by default, any `Method` (method.py) plugged into the same loop;
`evaluate(model_dir, text_file)` scores one with sliding-window perplexity and bits per byte."""

from lmstack.train.config import TrainConfig
from lmstack.train.evaluate import EvalResult, evaluate
from lmstack.train.loop import TrainHooks, TrainResult, train
from lmstack.train.method import Method, MethodContext
from lmstack.train.pretrain import Pretraining

__all__ = [
    "EvalResult",
    "Method",
    "MethodContext",
    "Pretraining",
    "TrainConfig",
    "TrainHooks",
    "TrainResult",
    "evaluate",
    "train",
]
