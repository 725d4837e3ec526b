"""The README's Python example: 5 agents on a ring, non-IID digits, DIMAT merges every 2 epochs.

python examples/quickstart.py
"""

from lightning.pytorch import Trainer

from lightning_dimat import DIMATStrategy, MergeCallback
from lightning_dimat.data import DigitsDataModule
from lightning_dimat.models import ImageClassifier

model, data = ImageClassifier("mlp", {"in_features": 64}, lr=0.01), DigitsDataModule()
trainer = Trainer(
    max_epochs=20,
    strategy=DIMATStrategy(num_agents=5, topology="ring", partition="by_class"),
    callbacks=[MergeCallback(every_n_epochs=2)],  # DIMAT: activation matching, one shared basis
)
trainer.fit(model, datamodule=data)  # trains 5 copies of `model`, each on its own 2 classes
trainer.test(model, datamodule=data)  # every agent on the full test set: agent_<g>/test_acc and test_acc
