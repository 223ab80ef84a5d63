"""Data: one shard format, converters, toy scenes + oracle, the shared WebDataset pipeline and
LightningDataModules. See docs/ARCHITECTURE.md for the batch dict and coordinate conventions."""
from .datamodule import OPADataModule, PIPEDataModule, ShardDataModule, ToyDataModule

__all__ = ["ShardDataModule", "ToyDataModule", "OPADataModule", "PIPEDataModule"]
