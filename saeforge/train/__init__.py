from saeforge.train.config import TrainConfig
from saeforge.train.trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
