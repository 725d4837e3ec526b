"""DataModules: scikit-learn's digits (offline, the quick-start default)."""

from lightning_dimat.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
