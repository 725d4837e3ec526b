"""scikit-learn's handwritten digits (1,797 8×8 images, 10 classes): offline, for quick-starts and tests."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

from lightning_dimat.data.splits import stratified_split


class DigitsDataModule(LightningDataModule):
    """Digits as ``(1, 8, 8)`` float tensors in [0, 1] with integer labels; a stratified train/val/test split.

    Args:
        batch_size: batch size of every loader.
        val_fraction: share of the images held out for validation.
        test_fraction: share held out for testing.
        seed: seed of the split.
        num_workers: DataLoader workers.

    Examples:
        >>> data = DigitsDataModule(batch_size=32)
        >>> data.setup("fit")
        >>> len(data.train_set), len(data.val_set)
        (1259, 179)
    """

    def __init__(
        self,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in (0, 1) "
                "and sum to less than 1."
            )
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.num_workers = num_workers

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        if hasattr(self, "train_set"):
            return
        digits = load_digits()
        images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
        labels = torch.tensor(digits.target, dtype=torch.long)
        train, val, test = stratified_split(digits.target, (self.val_fraction, self.test_fraction), self.seed)
        self.train_set = TensorDataset(images[train], labels[train])
        self.val_set = TensorDataset(images[val], labels[val])
        self.test_set = TensorDataset(images[test], labels[test])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256, num_workers=self.num_workers)
