"""Data: one shard format, converters, the shared WebDataset pipeline and the LightningDataModule;
data kinds (the toy scenes) plug in through hooks (kinds.py). See docs/ARCHITECTURE.md for the
batch dict and coordinate conventions.

`ShardDataModule` is loaded on first use (PEP 562): the converters and the shard format do not
import Lightning."""

__all__ = ["ShardDataModule"]


def __getattr__(name: str):
    if name != "ShardDataModule":
        raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
    from .datamodule import ShardDataModule

    return ShardDataModule
