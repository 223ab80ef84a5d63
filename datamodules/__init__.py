"""Data: one shard format, converters, the shared WebDataset pipeline and the LightningDataModule;
data kinds (the toy scenes) plug in through hooks (kinds.py). See docs/ARCHITECTURE.md for the
batch dict and coordinate conventions."""
from .datamodule import ShardDataModule

__all__ = ["ShardDataModule"]
