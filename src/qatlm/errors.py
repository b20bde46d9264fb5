"""The one exception type users see: its message is printed as a single line by the CLI."""


class QatlmError(Exception):
    """A problem with the user's input or environment, explained in one line."""


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


def check_device(device: str) -> None:
    """A torch device this machine has: unknown names and missing GPUs are refused before any work."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise QatlmError(f"--device {device}: unknown device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise QatlmError(f"--device {device}: no CUDA GPU is visible on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise QatlmError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise QatlmError(f"--device {device}: unsupported device type '{dev.type}'")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise QatlmError(f"--device {device}: MPS is not available on this machine")
