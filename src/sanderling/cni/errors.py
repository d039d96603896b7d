"""CNI error codes (spec section "Error") and Sanderling's plugin-specific ones (100+)."""

from __future__ import annotations

E_INCOMPATIBLE = 1
E_UNSUPPORTED_FIELD = 2
E_UNKNOWN_CONTAINER = 3
E_BAD_ENV = 4
E_IO = 5
E_DECODE = 6
E_BAD_CONFIG = 7
E_BAD_NETNS = 8
E_TRY_LATER = 11
E_NOT_AVAILABLE = 50
E_LIMITED_CONNECTIVITY = 51
# plugin specific
E_IP_IN_USE = 100
E_OUTSIDE_POOLS = 101
E_POOL_EXHAUSTED = 102
E_INTERFACE_EXISTS = 103
E_PLUMBING = 104
E_CHECK_FAILED = 105
E_INTERNAL = 199  # the shim itself failed unexpectedly


class CniFailure(Exception):
    """A request the agent refuses; becomes the CNI error JSON the shim prints."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out
