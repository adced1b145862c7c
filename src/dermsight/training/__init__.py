"""The training room: typed config, the transfer-learning loop, checkpoints and the saved model's contract."""

from dermsight.training.config import TrainConfig
from dermsight.training.loop import FitResult, fit, predict, train, train_one_epoch

__all__ = ["FitResult", "TrainConfig", "fit", "predict", "train", "train_one_epoch"]
