"""Pretraining: `train(TrainConfig(...))` takes raw text (or a prepared dataset) to a checkpointed model;
`evaluate(model_dir, text_file)` scores one with sliding-window perplexity and bits per byte."""

from lmstack.train.config import TrainConfig
from lmstack.train.evaluate import EvalResult, evaluate
from lmstack.train.loop import TrainHooks, TrainResult, train

__all__ = ["EvalResult", "TrainConfig", "TrainHooks", "TrainResult", "evaluate", "train"]
