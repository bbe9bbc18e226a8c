"""Training: the loop, its configuration, the collator, and where processor, model and data come from.

    from idefics3_kit.train import TrainConfig, train
    import idefics3_kit.recipes.demo        # registers the demo's synthetic data and model
    model = train(TrainConfig(...))
"""

from .collator import Collator, chat_messages
from .config import COMPONENTS, TrainConfig
from .loop import STATE_FILE, freeze, load_trainer_state, lr_factor, make_optimizer, save_checkpoint, train

__all__ = ["COMPONENTS", "Collator", "STATE_FILE", "TrainConfig", "chat_messages", "freeze", "load_trainer_state",
           "lr_factor", "make_optimizer", "save_checkpoint", "train"]
