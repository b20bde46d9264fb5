"""``qatlm upload DIR REPO``: a finished qatlm output folder (a checkpoint or an export, with its model card) pushed to the
Hugging Face hub with ``huggingface_hub`` (``create_repo`` + ``upload_folder``). An unfinished folder (a work or partial
folder, no config or weights) or one qatlm did not write is refused in one line before anything is sent."""

from __future__ import annotations

from pathlib import Path

from qatlm.errors import QatlmError


def files_to_send(folder) -> list[Path]:
    """The files of a finished qatlm output folder, or a one-line refusal."""
    d = Path(folder).expanduser()
    if not d.is_dir():
        raise QatlmError(f"{d} is not a folder" if d.exists() else f"{d} does not exist")
    if d.name.endswith(".work") or ".partial-" in d.name or ".old-" in d.name:
        raise QatlmError(f"{d} is an unfinished run's folder, not an output: upload the finished --out folder")
    card = d / "README.md"
    if not card.is_file() or "- qatlm" not in card.read_text(errors="replace"):
        raise QatlmError(f"{d} was not written by qatlm (no qatlm model card): upload a folder that qatlm quantize, train or "
                         "export wrote")
    if not (d / "config.json").is_file() and not any(d.glob("*.gguf")):
        raise QatlmError(f"{d} is unfinished: it has no config.json and no GGUF file")
    if (d.parent / f".{d.name}.lock").exists():
        raise QatlmError(f"a qatlm run is still writing {d} (its lock .{d.name}.lock is there)")
    return sorted(f for f in d.rglob("*") if f.is_file())


def upload(folder, repo: str, private: bool = False, dry_run: bool = False) -> list[Path]:
    files = files_to_send(folder)
    if dry_run:
        return files
    import os

    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise QatlmError(f"upload to {repo} failed: HF_HUB_OFFLINE is set (the hub cannot be reached)")
    if get_token() is None:
        raise QatlmError(f"upload to {repo} failed: no Hugging Face credentials; log in with `hf auth login` (or set HF_TOKEN)")
    try:
        api = HfApi()
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(Path(folder).expanduser()), repo_id=repo, repo_type="model",
                          commit_message="qatlm upload")
    except Exception as e:  # noqa: BLE001 - no credentials, no network, no permission: one line, whatever the type
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise QatlmError(f"upload to {repo} failed ({type(e).__name__}: {msg}); log in with `hf auth login` and check the "
                         "network") from None
    return files
