"""`vlmtune export ... --push-to-hub REPO`: the finished export folder uploaded as it is, card included.

The folder is written and checked first; the upload only copies it (huggingface_hub's upload_folder),
so a failed push leaves the local export intact and it can be pushed again by hand.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.after.export import ExportError


def push_to_hub(folder: Path, repo: str, private: bool = True) -> str:
    """Create ``repo`` (private unless told) if needed and upload ``folder``; returns the repo's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="vlmtune export")
    except Exception as exc:  # network, auth, offline mode: huggingface_hub raises many types
        raise ExportError(
            f"could not push {folder} to the hub repo {repo}: {type(exc).__name__}: {exc}".strip(),
            hint=f"the export is complete locally; log in (`hf auth login`) and retry, or run "
            f"`hf upload {repo} {folder}` by hand",
        ) from None
    return str(url)
