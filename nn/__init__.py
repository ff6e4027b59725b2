"""Layers, losses, optimizers and a trainer on the fused kernels (``import nn``).

Keras-like surface, PyTorch-like state::

    model = nn.Sequential([nn.Dense(128, activation="relu"), nn.Dropout(0.2), nn.Dense(10)], seed=0)
    trainer = nn.Trainer(model, loss="softmax_cross_entropy", optimizer=nn.Adam(lr=1e-3))
    history = trainer.fit(X, y, epochs=20, batch_size=32, validation_split=0.1,
                          callbacks=[nn.EarlyStopping(patience=3)])

Every computation goes through the public ``kernels`` API; the model's parameters and gradients are
views into one flat buffer each, so an optimizer step is one fused kernel call.
"""

from . import checkpoint, schedules
from .callbacks import Callback, EarlyStopping
from .health import GradientHealth, GradientWarning, NonFiniteError
from .layers import (Activation, BatchNorm, Dense, Dropout, Layer, LeakyReLU, ReLU, Sequential, Sigmoid, Softmax,
                     Tanh)
from .losses import MSE, BinaryCrossEntropy, Hinge, Loss, SoftmaxCrossEntropy
from .optim import SGD, Adadelta, Adagrad, Adam, AdamW, Optimizer, RMSProp, clip_grad_norm
from .schedules import CosineDecay, StepDecay
from .trainer import History, Trainer

__all__ = [
    "Sequential", "Layer", "Dense", "Activation", "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "Softmax", "Dropout",
    "BatchNorm", "Loss", "SoftmaxCrossEntropy", "MSE", "BinaryCrossEntropy", "Hinge", "Optimizer", "SGD", "Adam",
    "AdamW", "RMSProp", "Adagrad", "Adadelta", "clip_grad_norm", "StepDecay", "CosineDecay", "Trainer",
    "History", "Callback", "EarlyStopping", "GradientHealth", "GradientWarning", "NonFiniteError",
    "checkpoint", "schedules",
]
