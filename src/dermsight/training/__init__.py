"""The training room: typed config, the transfer-learning loop, checkpoints and the saved model's contract."""

from dermsight.training.config import TrainConfig
from dermsight.training.data import PreparedData, prepare_data
from dermsight.training.engine import Learner, predict, train_one_epoch
from dermsight.training.ensembles import train
from dermsight.training.finish import FitResult
from dermsight.training.fit import fit

__all__ = [
    "FitResult",
    "Learner",
    "PreparedData",
    "TrainConfig",
    "fit",
    "predict",
    "prepare_data",
    "train",
    "train_one_epoch",
]
