"""Uploading an adapter to the Hugging Face Hub."""

from __future__ import annotations

import os
import tempfile
from typing import Protocol

from huggingface_hub import CommitInfo, HfApi

from ..files import atomic_write_bytes
from .card import model_card
from .protocol import AdapterModel


class SavesPretrained(AdapterModel, Protocol):
    """An adapter model with ``save_pretrained(folder)``, such as :class:`~drt_peft.DRTModel`."""

    def save_pretrained(self, save_directory: str | os.PathLike) -> None: ...


def push_to_hub(
    model: SavesPretrained,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload drt_peft adapter",
    create_repo: bool = True,
    endpoint: str | None = None,
) -> CommitInfo:
    """Save ``model``'s adapter to a temporary folder and upload it to ``repo_id`` in one commit; the model
    card's snippet loads it from ``repo_id``.

    ``endpoint`` overrides the Hub address (default: ``HF_ENDPOINT`` or huggingface.co).
    """
    api = HfApi(endpoint=endpoint, token=token)
    if create_repo:
        api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        atomic_write_bytes(os.path.join(folder, "README.md"), model_card(model, repo_id).encode())
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=commit_message)
