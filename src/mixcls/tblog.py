"""TensorBoard logging of a fold (`--log tensorboard`): scalars per epoch and per step, and the
confusion matrix of the best epoch, under RUN/tensorboard/fold_K/. Rank 0 only."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mixcls.config import ConfigError


def check_tensorboard() -> None:
    """ConfigError when the tensorboard package (which SummaryWriter writes through) is missing."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError("log: tensorboard needs the tensorboard package; pip install tensorboard "
                          "(or drop --log tensorboard)") from None


class FoldBoard:
    """One fold's SummaryWriter; epochs are numbered as in history.csv (1 = the first)."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_step(self, step: int, lr: float) -> None:
        """The learning rate after optimizer step `step` (counted over the whole fold)."""
        self.writer.add_scalar("train/lr", lr, global_step=step)

    def step_logger(self, *, first_step: int):
        """`on_lr(steps, lr)` for an epoch whose step 1 is the fold's step first_step + 1."""
        return lambda steps, lr: self.log_step(first_step + steps, lr)

    def log_epoch(self, row: dict[str, float]) -> None:
        """A history.csv row: train/valid loss and accuracy, valid macro F1, images per second."""
        epoch = int(row["epoch"])
        for tag, key in EPOCH_TAGS.items():
            self.writer.add_scalar(tag, row[key], global_step=epoch)
        self.writer.flush()

    def log_confusion(self, labels: np.ndarray, probs: np.ndarray, classes: list[str],
                      epoch: int) -> None:
        """The confusion matrix of `labels` (N,) against argmax of `probs` (N, K), as an image."""
        self.writer.add_figure("valid/confusion_matrix", _confusion_figure(labels, probs, classes),
                               global_step=epoch, close=False)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


EPOCH_TAGS = {"train/loss": "train_loss", "train/accuracy": "train_accuracy",
              "valid/loss": "valid_loss", "valid/accuracy": "valid_accuracy",
              "valid/macro_f1": "valid_macro_f1",
              "train/images_per_s": "images_per_s"}


def open_board(run_dir: Path, fold: int, *, enabled: bool) -> FoldBoard | None:
    return FoldBoard(Path(run_dir) / "tensorboard" / f"fold_{fold}") if enabled else None


def _confusion_figure(labels: np.ndarray, probs: np.ndarray, classes: list[str]):
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    fig = Figure(figsize=(1.0 + 0.5 * len(classes), 0.8 + 0.5 * len(classes)))
    ax = fig.add_subplot()
    ConfusionMatrixDisplay.from_predictions(labels, probs.argmax(1), labels=list(range(len(classes))),
                                            display_labels=classes, ax=ax, colorbar=False)
    return fig
