"""A Hugging Face hub cache on disk, as `huggingface_hub.snapshot_download` leaves it, built from a
local folder: hub ids resolve offline (HF_HUB_OFFLINE=1) to that folder's files.

    models--{org}--{name}/blobs/{sha256}                  the file contents
    models--{org}--{name}/snapshots/{commit}/{path}     -> ../../blobs/{sha256} (relative links)
    models--{org}--{name}/refs/main                        {commit}
"""

import hashlib
import os
import shutil
from pathlib import Path


def add_to_hub_cache(cache_dir, repo_id: str, folder) -> Path:
    """Put `folder`'s files into the hub cache `cache_dir` (HF_HUB_CACHE) as `repo_id`'s main
    revision; returns the snapshot folder snapshot_download will return."""
    folder, storage = Path(folder), Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    # a commit id as the hub's (40 hex digits), derived from the paths and contents
    commit = hashlib.sha1(
        "".join(f"{p.relative_to(folder)}:{d}\n" for p, d in digests.items()).encode()
    ).hexdigest()
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    for path, digest in digests.items():
        blob = storage / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return snapshot
