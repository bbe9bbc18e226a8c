"""Training: fine-tune a VLM on your conversations, in one process or under torchrun (DDP, FSDP2).

    from idefics3_kit.train import Trainer, TrainConfig
    Trainer(model, processor, TrainConfig(data={"source": "my_data.jsonl"}, ...)).fit()

- ``config``: TrainConfig (read from JSON/YAML, unknown keys refused)
- ``data``: conversation records from files or a datasets.Dataset, checked up front
- ``collator``: conversations -> batches whose labels are the assistant's turns
- ``sampling``: which examples make each step (the same at any world size)
- ``distributed``: device, process group, DDP / FSDP2
- ``adapters``: LoRA (peft), frozen components, per-component learning rates, adapter export
- ``checkpoint``: DCP checkpoints, atomic and reshardable
- ``metrics``: metrics.jsonl and TensorBoard
- ``sources``: what a config's model / processor / data names
- ``trainer``: the Trainer
"""

from .collator import ConversationCollator, chat_messages
from .config import COMPONENTS, DataConfig, EvalConfig, LoraConfig, ParallelConfig, TrainConfig
from .data import Conversation, ConversationDataset, RecordError
from .trainer import Trainer, lr_factor

__all__ = ["COMPONENTS", "Conversation", "ConversationCollator", "ConversationDataset", "DataConfig", "EvalConfig",
           "LoraConfig", "ParallelConfig", "RecordError", "TrainConfig", "Trainer", "chat_messages", "lr_factor"]
