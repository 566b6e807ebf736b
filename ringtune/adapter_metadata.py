"""The adapter's ``ringtune.json``: written by the coordinator beside the peft adapter (plan, losses, settings),
read where the adapter is used (``ringtune evaluate`` on the owner)."""
from __future__ import annotations

import json
from pathlib import Path

from ringtune.privacy_spec import PrivacySpec

ADAPTER_METADATA_FILE = "ringtune.json"


def trained_privacy(adapter: Path) -> PrivacySpec:
    """The privacy the adapter was trained under (off for an adapter without ringtune.json: plain peft)."""
    path = adapter / ADAPTER_METADATA_FILE
    if not path.is_file():
        return PrivacySpec()
    return PrivacySpec.from_dict(json.loads(path.read_text()).get("settings", {}).get("privacy"))
