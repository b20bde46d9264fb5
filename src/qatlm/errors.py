"""The one exception type users see: its message is printed as a single line by the CLI."""


class QatlmError(Exception):
    """A problem with the user's input or environment, explained in one line."""


MAX_SEED = 2**63 - 1  # torch's generators take seeds in [0, 2^63)
MAX_LR = 10.0  # a learning rate above this is no setting (rates are fractions of a range per step, or Adam's)


def check_number(option: str, value, *, at_least=None, above=None, at_most=None, below=None) -> None:
    """Refuse an out-of-range option in one line naming it as the CLI spells it (``None`` = unset, allowed)."""
    import math

    if value is None:
        return
    flag = "--" + option.replace("_", "-")
    if isinstance(value, float) and not math.isfinite(value):
        raise QatlmError(f"{flag} must be a finite number, got {value}")
    for bound, ok, word in ((at_least, lambda b: value >= b, ">="), (above, lambda b: value > b, ">"),
                            (at_most, lambda b: value <= b, "<="), (below, lambda b: value < b, "<")):
        if bound is not None and not ok(bound):
            raise QatlmError(f"{flag} must be {word} {bound}, got {value}")


def resolve_device(device: str) -> str:
    """``auto``: ``cuda`` when torch sees a GPU, else ``cpu``; any other name as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> None:
    """A torch device this machine has: unknown names and missing GPUs are refused before any work."""
    import torch

    shown = device if device.strip() == device and device else repr(device)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise QatlmError(f"--device {shown}: unknown device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            raise QatlmError(f"--device {device}: no CUDA GPU is visible on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise QatlmError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise QatlmError(f"--device {device}: unsupported device type '{dev.type}'")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise QatlmError(f"--device {device}: MPS is not available on this machine")


def crash_report(command: str, label: str | None = None) -> str:
    """For an exception nobody foresaw (called in an ``except`` block): the whole traceback written to a file, and
    the one line that names the command, the exception and that file."""
    import os
    import sys
    import tempfile
    import time
    import traceback

    exc = sys.exc_info()[1]
    text = traceback.format_exc()
    path = os.path.join(tempfile.gettempdir(), f"qatlm-{command}-traceback-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt")
    try:
        with open(path, "w") as fh:
            fh.write(f"qatlm {command} ({' '.join(sys.argv)})\n\n{text}")
    except OSError:
        path = "(could not be written)"
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return (f"{label or 'qatlm ' + command} failed unexpectedly ({type(exc).__name__}{': ' + first if first else ''}); the full "
            f"traceback is in {path}")


class on_sigterm:
    """While active, SIGTERM (what a scheduler or ``docker stop`` sends) stops the run like Ctrl-C: as a
    ``KeyboardInterrupt``, so locks are released, unfinished outputs removed and resumable work kept."""

    def __enter__(self):
        import signal
        import threading

        self.previous = None
        if threading.current_thread() is threading.main_thread():

            def stop(signum, frame):
                raise KeyboardInterrupt("SIGTERM")
            self.previous = signal.signal(signal.SIGTERM, stop)
        return self

    def __exit__(self, *exc):
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False
