"""What the plotting tools share: torch on one thread for tiny tensors, the figure options, and saving a figure."""

import contextlib
import os


@contextlib.contextmanager
def one_thread():
    """
    Runs torch on one thread: calls on one-anchor tensors are otherwise
    dominated by thread synchronisation (about 100x slower on a busy 2-core machine).
    """
    import torch  # here, so that tools which draw no tensors do not load torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def save_figure(fig, output: str, dpi: int):
    """Writes ``fig`` to ``output`` (creating its directory) and closes it."""
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=dpi)
    plt.close(fig)


def add_figure_arguments(parser, output: str, height: float):
    """Adds ``--output`` (default ``output``), ``--width``, ``--height`` (default ``height``) and ``--dpi``."""
    parser.add_argument(
        "--output",
        default=output,
        help="the figure to write (default: %(default)s, README's, replaced)",
    )
    parser.add_argument("--width", type=float, default=12.0, help="inches")
    parser.add_argument("--height", type=float, default=height, help="inches")
    parser.add_argument("--dpi", type=int, default=100)
