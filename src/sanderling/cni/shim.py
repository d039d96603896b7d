"""`sanderling-cni`: the CNI plugin executable the container runtime runs for every sandbox.

Standard library only, and only its C-level parts (`_json`, `_socket`, `posix`): importing the
`json` and `socket` packages costs about 18 ms here, the whole shim should cost less than that.
It validates the request the way the spec (and libcni's skel) does, forwards it to the node
agent over a root-only unix socket, and prints the spec's result or error JSON.

The agent installs this file as the CNI binary with a shebang running the interpreter directly
with `-I -S` (no site, no pyenv shim).
"""

import _json
import _socket
import posix
import sys

SUPPORTED = ("0.4.0", "1.0.0", "1.1.0")
DEFAULT_SOCKET = "/run/sanderling/cni.sock"

E_INCOMPATIBLE = 1
E_UNSUPPORTED_FIELD = 2
E_BAD_ENV = 4
E_IO = 5
E_DECODE = 6
E_BAD_CONFIG = 7
E_BAD_NETNS = 8
E_TRY_LATER = 11
E_NOT_AVAILABLE = 50
E_INTERNAL = 199

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")
REQUIRED_ENV = {
    "ADD": ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "GC": ("CNI_COMMAND", "CNI_PATH"),
    "STATUS": ("CNI_COMMAND", "CNI_PATH"),
    "VERSION": ("CNI_COMMAND",),
}


class CniError(Exception):
    def __init__(self, code, msg, details=""):
        Exception.__init__(self, msg)
        self.code = code
        self.msg = msg
        self.details = details


# ---- JSON with the C accelerators only ------------------------------------------------------

class _Ctx:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant: object = None
    memo = None


_ctx = _Ctx()
_ctx.parse_constant = lambda name: float(name.lower().replace("infinity", "inf"))
_scan = _json.make_scanner(_ctx)  # type: ignore[arg-type]
_WS = " \t\n\r"


def loads(text):
    i = 0
    n = len(text)
    while i < n and text[i] in _WS:
        i += 1
    try:
        value, end = _scan(text, i)
    except (StopIteration, SystemError, ValueError, TypeError):
        # without the json package the C scanner cannot build its JSONDecodeError
        raise ValueError("malformed JSON near character %d" % i) from None
    while end < n and text[end] in _WS:
        end += 1
    if end != n:
        raise ValueError("extra data at character %d" % end)
    return value


def dumps(value):
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _json.encode_basestring_ascii(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(_json.encode_basestring_ascii(str(k)) + ": " + dumps(v) for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(dumps(v) for v in value) + "]"
    raise TypeError("cannot encode %r" % (value,))


# ---- validation -----------------------------------------------------------------------------

def _name_ok(name, first_alnum=True):
    if not name:
        return False
    if first_alnum and not name[0].isalnum():
        return False
    for ch in name:
        if not (ch.isascii() and (ch.isalnum() or ch in "_.-")):
            return False
    return True


def _ifname_problem(name):
    if not name:
        return "interface name is empty"
    if len(name) > 15:
        return "interface name is too long"
    if name in (".", ".."):
        return "interface name is . or .."
    for ch in name:
        if ch == "/" or ch == ":" or ch.isspace():
            return "interface name contains / or : or whitespace"
    return None


def _version_tuple(v):
    try:
        return tuple(int(x) for x in v.split("."))
    except (AttributeError, ValueError):
        return None


def validate(env, stdin_text):
    """Return (command, config dict) or raise CniError, in the order skel checks things."""
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise CniError(E_BAD_ENV, "required env variables [CNI_COMMAND] missing")
    if command not in COMMANDS:
        raise CniError(E_BAD_ENV, "unknown CNI_COMMAND: %s" % command)
    missing = [k for k in REQUIRED_ENV[command] if k not in env or (env[k] == "" and k != "CNI_NETNS")]
    if missing:
        raise CniError(E_BAD_ENV, "required env variables [%s] missing" % ", ".join(missing))
    if command in ("ADD", "DEL", "CHECK"):
        cid = env["CNI_CONTAINERID"]
        if not _name_ok(cid):
            raise CniError(E_BAD_ENV, "invalid characters in containerID", cid)
        problem = _ifname_problem(env["CNI_IFNAME"])
        if problem:
            raise CniError(E_BAD_ENV, "invalid CNI_IFNAME %r: %s" % (env["CNI_IFNAME"], problem))
    try:
        conf = loads(stdin_text) if stdin_text.strip() else {}
    except ValueError as exc:
        raise CniError(E_DECODE, "failed to decode network configuration on stdin: %s" % exc) from None
    if not isinstance(conf, dict):
        raise CniError(E_DECODE, "network configuration on stdin is not a JSON object")
    version = conf.get("cniVersion", "")
    if command == "VERSION":
        return command, conf
    if version not in SUPPORTED:
        raise CniError(E_INCOMPATIBLE, "incompatible CNI version %s" % (version or "(none)"),
                       "supported: %s" % ", ".join(SUPPORTED))
    vt = _version_tuple(version)
    if command == "CHECK" and vt < (0, 4, 0):
        raise CniError(E_INCOMPATIBLE, "config version does not allow CHECK")
    if command in ("GC", "STATUS") and vt < (1, 1, 0):
        raise CniError(E_INCOMPATIBLE, "config version does not allow %s" % command)
    name = conf.get("name")
    if command != "STATUS" and (not isinstance(name, str) or not _name_ok(name)):
        raise CniError(E_BAD_CONFIG, "invalid network name %r: must start with a letter or digit and contain "
                       "only letters, digits, '_', '.' and '-'" % (name,))
    if command == "ADD":
        netns = env["CNI_NETNS"]
        if not netns.startswith("/"):
            # a relative path would be resolved against whatever directory the runtime ran us in
            raise CniError(E_BAD_NETNS, "CNI_NETNS %r is not an absolute path" % (netns,))
        try:
            if posix.stat(netns).st_ino == posix.stat("/proc/self/ns/net").st_ino:
                raise CniError(E_BAD_NETNS, "netns %s is the plugin's own network namespace" % netns)
        except OSError as exc:
            raise CniError(E_BAD_NETNS, "cannot use netns %s: %s" % (netns, exc.strerror)) from None
    return command, conf


def parse_cni_args(text):
    out = {}
    for part in text.split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k] = v
    return out


# ---- talking to the agent -------------------------------------------------------------------

def call_agent(path, request, timeout=60.0):
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(dumps(request).encode() + b"\n")
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
            if data.endswith(b"\n"):
                break
    finally:
        sock.close()
    if not chunks:  # the agent went away mid-request (killed, restarting): the runtime retries
        raise ConnectionResetError("the agent closed the connection before answering")
    return loads(b"".join(chunks).decode())


def request_for(command, env, conf):
    """The request the agent takes, from a validated environment and configuration."""
    return {
        "command": command,
        "containerID": env.get("CNI_CONTAINERID", ""),
        "netns": env.get("CNI_NETNS", ""),
        "ifname": env.get("CNI_IFNAME", ""),
        "args": parse_cni_args(env.get("CNI_ARGS", "")),
        "config": conf,
    }


def config_version(conf, default="1.1.0"):
    version = conf.get("cniVersion", default)
    return version if isinstance(version, str) else default


def version_output(version):
    return 0, dumps({"cniVersion": version or "1.1.0", "supportedVersions": list(SUPPORTED)})


def reply_output(reply):
    """(exit code, stdout) for the agent's reply to a request."""
    if reply.get("error"):
        err = reply["error"]
        raise CniError(int(err.get("code", 999)), str(err.get("msg", "agent error")), str(err.get("details", "")))
    result = reply.get("result")
    return 0, "" if result is None else dumps(result)


def error_output(exc, version):
    """(exit code, stdout) for a failure: always the spec's error object, never a traceback."""
    if not isinstance(exc, CniError):
        exc = CniError(E_INTERNAL, "internal error in sanderling-cni: %s" % exc)
    out = {"cniVersion": version if version in SUPPORTED else "1.1.0", "code": exc.code, "msg": exc.msg}
    if exc.details:
        out["details"] = exc.details
    return 1, dumps(out)


def run(env, stdin_text):
    """Return (exit code, stdout text)."""
    version = "1.1.0"
    try:
        command, conf = validate(env, stdin_text)
        version = config_version(conf, version)
        if command == "VERSION":
            return version_output(version)
        socket_path = conf.get("agentSocket") or env.get("SANDERLING_CNI_SOCKET") or DEFAULT_SOCKET
        try:
            reply = call_agent(socket_path, request_for(command, env, conf))
        except OSError as exc:
            code = E_NOT_AVAILABLE if command == "STATUS" else E_TRY_LATER
            raise CniError(code, "sanderling agent not reachable at %s: %s" % (socket_path, exc),
                           "is sanderling-agent running on this node?") from None
        except ValueError as exc:
            raise CniError(E_IO, "bad reply from the sanderling agent: %s" % exc) from None
        return reply_output(reply)
    except Exception as exc:
        return error_output(exc, version)


def main():
    env = dict(posix.environ)
    decoded = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in env.items()}
    try:
        stdin_text = sys.stdin.read() if sys.stdin is not None else ""
    except (OSError, UnicodeDecodeError):
        stdin_text = ""
    code, out = run(decoded, stdin_text)
    if out:
        sys.stdout.write(out + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
