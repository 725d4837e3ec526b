"""Train/validation/test splits shared by the DataModules: stratified splits, a validation hold-out that is
never augmented, and the loaders over the three sets."""

from __future__ import annotations

import numpy as np
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Subset


def stratified_split(
    labels: np.ndarray, fractions: tuple[float, float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices for train / val / test, each class split in the given proportions."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for label in np.unique(labels):
        indices = rng.permutation(np.flatnonzero(labels == label))
        n_val = round(len(indices) * fractions[0])
        n_test = round(len(indices) * fractions[1])
        parts[1].append(indices[:n_val])
        parts[2].append(indices[n_val : n_val + n_test])
        parts[0].append(indices[n_val + n_test :])
    train, val, test = (np.sort(np.concatenate(part)) for part in parts)
    return train, val, test


def holdout_split(
    train_set: Dataset, eval_train_set: Dataset, labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[Subset, Subset]:
    """A stratified, seeded hold-out: ``(Subset(train_set, rest), Subset(eval_train_set, held_out))``.

    ``eval_train_set`` is the same data as ``train_set`` with the evaluation transform, so the validation
    images are never augmented.
    """
    train, val, _ = stratified_split(labels, (val_fraction, 0.0), seed)
    if len(val) == 0 or len(train) == 0:
        raise ValueError(
            f"val_fraction={val_fraction} of {len(labels)} training images leaves "
            f"{len(train)} for training and {len(val)} for validation; choose a fraction that keeps both."
        )
    return Subset(train_set, train.tolist()), Subset(eval_train_set, val.tolist())


def check_fraction(val_fraction: float) -> None:
    """Raises ``ValueError`` unless ``0 <= val_fraction < 1``."""
    if not 0 <= val_fraction < 1:
        raise ValueError(
            f"val_fraction must be in [0, 1) (0: validate on the test split), got {val_fraction}."
        )


class SplitDataModule(LightningDataModule):
    """Loaders over ``train_set``/``val_set``/``test_set``; :meth:`assign_splits` builds the three sets.

    Subclasses set ``batch_size``, ``num_workers``, ``val_fraction`` and ``seed`` and call
    :meth:`assign_splits` from ``setup``.
    """

    batch_size: int
    num_workers: int
    val_fraction: float
    seed: int

    def assign_splits(self, train: Dataset, eval_train: Dataset, test: Dataset, labels: np.ndarray) -> None:
        """Validation is a stratified hold-out of the training set (seen through ``eval_train``, the
        same data without augmentation) when ``val_fraction > 0``, else the test split."""
        self.test_set: Dataset = test
        if self.val_fraction > 0:
            self.train_set, self.val_set = holdout_split(
                train, eval_train, labels, self.val_fraction, self.seed
            )
        else:
            self.train_set, self.val_set = train, test

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
