"""Hub-ready folders: the format (``format``), writing, loading and verifying them (``folder``), crash-safe installs
and the recovery of killed runs (``install``), and publishing them with huggingface_hub (``publish``)."""
from .folder import load_hub_folder, save_hub_folder, verify_hub_folder
from .format import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, HubFolderError, architecture_of, weights_sha256
from .install import check_output_path, recover_output
from .publish import HubPushError, malformed_token, push_hub_folder

__all__ = [
    "CARD_NAME", "CONFIG_NAME", "WEIGHTS_NAME", "HubFolderError", "HubPushError", "architecture_of",
    "check_output_path", "load_hub_folder", "malformed_token", "push_hub_folder", "recover_output", "save_hub_folder",
    "verify_hub_folder", "weights_sha256",
]
