"""The main job: train an MLP on handwritten digits and report test accuracy.

    python -m nn.train                      # sklearn's digits, numba backend, ~0.97 test accuracy
    python -m nn.train --backend numpy --epochs 10 --plot curves.png --save model.npz
    python -m nn.train --data ~/mnist       # MNIST IDX files (or --data mnist.npz with x/y arrays)
    mpiexec -n 2 python -m nn.train         # data-parallel on 2 ranks: the same model as on 1

Prints a progress bar and per-epoch training/validation loss and accuracy, then samples per second and,
last, ``test accuracy: X``. Launched by ``mpiexec``/``srun`` on several ranks, it trains data-parallel
(``--batch-size`` is the global batch, shared by the ranks) and only rank 0 prints and saves.
"""

import argparse
import time

import kernels

from . import data as datasets
from . import distributed
from . import optim
from .callbacks import EarlyStopping
from .layers import Dense, Sequential
from .trainer import Trainer


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m nn.train", description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=("numpy", "numba", "cuda"), default="numba")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--optimizer", choices=sorted(optim.OPTIMIZERS), default="adam")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the optimizer's)")
    p.add_argument("--hidden", default="128,64", help="hidden layer widths, comma-separated")
    p.add_argument("--patience", type=int, default=8, help="early stopping patience on validation loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="MNIST IDX directory or .npz (x, y); default: sklearn digits")
    p.add_argument("--plot", default=None, metavar="FILE", help="write loss and accuracy curves to this PNG")
    p.add_argument("--save", default=None, metavar="FILE", help="save the trained model here (.npz)")
    p.add_argument("--verbose", type=int, default=1, help="0: only the summary lines")
    p.add_argument("--distributed", choices=("auto", "mpi", "off"), default="auto",
                   help="auto: data-parallel over MPI when launched on several ranks (mpiexec, srun); "
                        "off: every rank trains alone")
    return p.parse_args(argv)


def plot(history, path):
    """Loss and accuracy per epoch, training and validation, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("loss", "accuracy")):
        for prefix, label in (("", "training"), ("val_", "validation")):
            ax.plot(history.epochs, history[prefix + key], marker=".", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    """Run the job; returns the test metrics dict."""
    args = parse_args(argv)
    kernels.set_backend(args.backend)
    comm = distributed.get(args.distributed)  # before the model: on cuda it picks this rank's GPU
    say = print if comm.is_root else (lambda *a, **k: None)
    (X, y), test = datasets.load(args.data)
    if test is None:
        (X, y), test = datasets.split(X, y, 0.2, args.seed)
    (X_train, y_train), val = datasets.split(X, y, 0.1, args.seed + 1)
    n_classes = int(max(y.max(), test[1].max())) + 1
    hidden = [int(h) for h in args.hidden.split(",") if h]
    model = Sequential([Dense(h, activation="relu") for h in hidden] + [Dense(n_classes)], seed=args.seed)
    optimizer = optim.get(args.optimizer, **({} if args.lr is None else {"lr": args.lr}))
    trainer = Trainer(model, loss="softmax_cross_entropy", optimizer=optimizer, distributed=comm)
    say(f"{len(X_train)} training, {len(val[0])} validation, {len(test[0])} test samples; {X.shape[1]} "
        f"features, {n_classes} classes; {args.backend} backend; {optimizer}; {comm.size} rank"
        + ("s" if comm.size > 1 else ""))
    if args.backend != "cuda":  # compile (or load from Numba's cache) before the clock starts
        widths = [X.shape[1]] + hidden + [n_classes]
        parameters = sum((a + 1) * b for a, b in zip(widths, widths[1:]))
        largest = max(parameters, args.batch_size * max(widths[1:]), max(len(val[0]), len(test[0])) * n_classes)
        kernels.warmup(args.backend, dtypes=("float32",), verbose=args.verbose if comm.is_root else 0,
                       only=("matmul", "bias_act_backward", "bias_grad", "segment_norms", "softmax_cross_entropy",
                             args.optimizer.replace("adamw", "adam") + "_step", "count_correct", "check_step"),
                       activations=("relu",) if hidden else (), largest=largest)
    start = time.perf_counter()
    history = trainer.fit(X_train, y_train, epochs=args.epochs, batch_size=args.batch_size, validation_data=val,
                          seed=args.seed, callbacks=[EarlyStopping(patience=args.patience)], verbose=args.verbose)
    elapsed = time.perf_counter() - start
    metrics = trainer.evaluate(*test)
    if args.plot and comm.is_root:
        plot(history, args.plot)
        print(f"curves written to {args.plot}")
    if args.save:
        trainer.save(args.save)
        say(f"model saved to {args.save}")
    say(f"samples/s: {len(history.epochs) * len(X_train) / elapsed:.0f} ({len(history.epochs)} epochs of "
        f"{len(X_train)} samples in {elapsed:.2f}s, validation included)")
    say(f"test loss: {metrics['loss']:.4f}")
    say(f"test accuracy: {metrics['accuracy']:.4f}")
    return metrics


if __name__ == "__main__":
    main()
