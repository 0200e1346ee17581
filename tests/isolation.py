"""What keeps the test session out of the developer's home folder (used by ``conftest.py``; see there)."""
from __future__ import annotations

from pathlib import Path

# Where libraries put per-user files; unset, they default to folders under HOME, which the session replaces.
USER_DIRS = ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "CONVMIXER_TIMM_CACHE")
TELEMETRY_OFF = {"ORT_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}


def prepare_home(home: Path) -> None:
    """Make ``home`` a home folder whose user declined OpenVINO's telemetry (its consent file holds "0")."""
    (home / "intel").mkdir(parents=True, exist_ok=True)
    (home / "intel" / "openvino_telemetry").write_text("0")
