"""`sanderling-cni`: the CNI plugin executable (standard library only, so it starts in ms).

The full plugin (ADD/DEL/CHECK/GC/STATUS forwarded to the agent) is the CNI issue's work; until
then it answers VERSION and refuses every other command with a spec error, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys

SUPPORTED = ["0.4.0", "1.0.0", "1.1.0"]
ERR_UNSUPPORTED_FIELD = 4  # CNI spec: "invalid necessary environment variables" is 4


def main() -> int:
    command = os.environ.get("CNI_COMMAND", "")
    if command == "VERSION":
        print(json.dumps({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED}))
        return 0
    print(json.dumps({"cniVersion": "1.1.0", "code": 4 if not command else 7,
                      "msg": f"CNI command {command or '(none)'} is not served by this build",
                      "details": "sanderling-cni currently implements VERSION only"}))
    return 1


if __name__ == "__main__":
    sys.exit(main())
