"""The agent's settings: one table, one immutable type, validated in one place.

Every ``agent serve`` flag is a field of :class:`AgentConfig`. The field's
metadata (a :class:`Setting`) holds the flag, its ``WARMSTART_*`` environment
variable, the help text, the accepted form and the parser from text; the field's
default is the setting's default. The CLI builds ``serve``'s flags from this
table, and ``AgentConfig(...)`` checks every value in ``__post_init__``: an
``AgentConfig`` built by a test or a bench is held to the same rules as one built
from the command line, and there is no other place a default could disagree.

Nothing reads the environment at import time; :meth:`AgentConfig.from_texts`
takes the flags and the environment as arguments. The short-lived verbs
(``agent ls``, ``agent prefetch``) never import this module (dataclasses and
inspect cost them ~6 ms); only ``agent serve`` does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from agent.units import parse_size
from client.transport import DEFAULT_SOCKET

MiB = 1024 * 1024
GiB = 1024 * MiB
DEFAULT_PIECE_SIZE = 16 * MiB
MIN_PIECE_SIZE = 1 * MiB
MAX_PIECE_SIZE = 256 * MiB
MIN_INFLIGHT = 8 * MiB  # origin bytes in flight per host: at least a few 1 MiB ranges
MAX_INFLIGHT = 64 * GiB
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_YES = ("1", "true", "yes", "on")
_NO = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Setting:
    """One row of the settings table: how a field is named, typed in and checked.

    ``parse`` turns what a user typed (a flag's or an environment variable's
    text) into the field's value and raises ValueError when it cannot;
    ``check`` looks at a value however it was built and returns the problem,
    or None. ``show`` prints the default the way a user would type it.
    """

    flag: str
    env: str
    help: str
    form: str
    parse: Callable[[str], Any]
    check: Callable[[Any], str | None]
    show: Callable[[Any], str] = str
    boolean: bool = False


class SettingError(ValueError):
    """A setting's value is unusable. The one-line message names the flag, its variable and the accepted form."""

    def __init__(self, setting: Setting, problem: str) -> None:
        self.flag = setting.flag
        self.env = setting.env
        super().__init__(f"{setting.flag} / {setting.env}: {problem}; expected {setting.form}")


# ---------------------------------------------------------------- parsers and checks (one per kind of value)


def _text(value: str) -> str:
    return value


def _optional_text(value: str) -> str | None:
    return value or None


def _path_check(value: Any) -> str | None:
    if not isinstance(value, str) or not value or "\0" in value:
        return f"got {value!r}"
    return None


def _optional_path_check(value: Any) -> str | None:
    return None if value is None else _path_check(value)


def _whole(value: str) -> int:
    return int(value.strip())


def _at_least(least: int) -> Callable[[Any], str | None]:
    """A check for a whole number of at least ``least``."""

    def check(value: Any) -> str | None:
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            return f"got {value!r}"
        return None

    return check


_at_least_one = _at_least(1)


def _seconds(value: str) -> float:
    return float(value.strip())


def _seconds_check(least: float, most: float = math.inf, *, above: bool = False) -> Callable[[Any], str | None]:
    """A check for a finite number of seconds from ``least`` (or strictly ``above`` it) to ``most``."""

    def check(value: Any) -> str | None:
        number = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
        if not number or value > most or value < least or (above and value == least):
            return f"got {value!r}"
        return None

    return check


_positive_seconds = _seconds_check(0, above=True)
_wait_seconds = _seconds_check(0, 600)
_off_or_positive_seconds = _seconds_check(0)


def _size(value: str) -> int:
    return parse_size(value)


def show_size(n: int) -> str:
    """Bytes as a user types them, exactly: ``107374182400`` -> ``100GiB``."""
    for unit, scale in (("TiB", 1024**4), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def _capacity_check(value: Any) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return f"got {value!r}"
    return None


def _inflight_check(value: Any) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or not MIN_INFLIGHT <= value <= MAX_INFLIGHT:
        return f"got {value!r}"
    return None


def _piece_size_check(value: Any) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or not MIN_PIECE_SIZE <= value <= MAX_PIECE_SIZE:
        shown = show_size(value) if isinstance(value, int) and not isinstance(value, bool) else repr(value)
        return f"got {value!r}" + (f" ({shown})" if shown != repr(value) else "")
    return None


def split_hostport(text: str, host_required: bool = True) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); ValueError unless the port is 1-65535 (and a host is
    given, where one is required: ``--listen :7070`` means every address, a peer address must name one)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or (host_required and not host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host.strip("[]"), int(port)


def _hostport_check(value: Any, host_required: bool = True) -> str | None:
    if not isinstance(value, str):
        return f"got {value!r}"
    try:
        split_hostport(value, host_required)
    except ValueError:
        return f"got {value!r}"
    return None


def _listen_check(value: Any) -> str | None:
    return _hostport_check(value, host_required=False)


def _optional_hostport_check(value: Any) -> str | None:
    return None if value is None else _hostport_check(value)


def _peer_list(value: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in value.split(",") if a.strip())


def _peer_list_check(value: Any) -> str | None:
    if not isinstance(value, tuple):
        return f"got {value!r} (a tuple of addresses)"
    for addr in value:
        if _hostport_check(addr):
            return f"got {addr!r} in the list"
    return None


def _dns_name_check(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or any(c.isspace() or c in ":/" for c in value):
        return f"got {value!r}"
    return None


def _yes_no(value: str) -> bool:
    text = value.strip().lower()
    if text in _YES:
        return True
    if text in _NO:
        return False
    raise ValueError(value)


def _bool_check(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"got {value!r}"


def _octal_mode(value: str) -> int:
    return int(value.strip(), 8)


def _mode_check(value: Any) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0o777:
        return f"got {oct(value)[2:] if isinstance(value, int) else repr(value)}"
    return None


def _group(value: str) -> int | None:
    """A group name or a gid -> the gid (empty: none). Looked up here, so a typo fails at start, not at chgrp."""
    import grp

    name = value.strip()
    if not name:
        return None
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ValueError(f"no group named {name!r}") from None


def _gid_check(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return f"got {value!r}"
    return None


def _warm_set_file(value: str) -> str | None:
    return os.path.abspath(value) if value else None


def _lower(value: str) -> str:
    return value.strip().lower()


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"got {value!r}"

    return check


def _log_level(value: str) -> str:
    return value.strip().upper()


def _log_level_check(value: Any) -> str | None:
    return None if value in LOG_LEVELS else f"got {value!r}"


def _none_or(text: str) -> Callable[[Any], str]:
    return lambda v: text if v in (None, ()) else str(v)


def _setting(default: Any, **kw: Any) -> Any:
    """A dataclass field whose metadata is its row of the table."""
    if isinstance(default, tuple | list):
        return field(default=tuple(default), metadata={"setting": Setting(**kw)})
    return field(default=default, metadata={"setting": Setting(**kw)})


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class AgentConfig:
    """Everything `agent serve` is configured with; every value is checked when the object is built."""

    cache_dir: str = _setting(
        "/var/lib/warmstart", flag="--cache-dir", env="WARMSTART_CACHE_DIR",
        help="directory of the content-addressed cache (blobs, manifests, piece records)",
        form="a directory path", parse=_text, check=_path_check)
    socket: str = _setting(
        DEFAULT_SOCKET, flag="--socket", env="WARMSTART_SOCKET",
        help="Unix socket the local API is served on (what inference pods and the agent verbs dial)",
        form="a file path", parse=_text, check=_path_check)
    listen: str = _setting(
        "0.0.0.0:7070", flag="--listen", env="WARMSTART_LISTEN",
        help="HTTP address of /metrics, /livez, /readyz and the peer API",
        form="HOST:PORT with a port from 1 to 65535, like 0.0.0.0:7070", parse=_text, check=_listen_check)
    capacity: int = _setting(
        100 * GiB, flag="--capacity", env="WARMSTART_CAPACITY",
        help="bytes the cache may hold; least recently used unpinned models are evicted beyond it",
        form="a size above 0 like 500GiB or 2TB", parse=_size, check=_capacity_check, show=show_size)
    piece_size: int = _setting(
        DEFAULT_PIECE_SIZE, flag="--piece-size", env="WARMSTART_PIECE_SIZE",
        help="size of the pieces a file is fetched, verified and shared with peers in",
        form=f"a size from {show_size(MIN_PIECE_SIZE)} to {show_size(MAX_PIECE_SIZE)}",
        parse=_size, check=_piece_size_check, show=show_size)
    connections: int = _setting(
        8, flag="--connections", env="WARMSTART_CONNECTIONS",
        help="range requests each origin host starts with; the window then grows while throughput grows, up to "
             "--origin-connections, and halves when the origin throttles (503 SlowDown, 429, resets)",
        form="a whole number of at least 1", parse=_whole, check=_at_least_one)
    origin_connections: int = _setting(
        128, flag="--origin-connections", env="WARMSTART_ORIGIN_CONNECTIONS",
        help="the most range requests in flight to one origin host (an S3 bucket, the Hub, one https server)",
        form="a whole number of at least 1", parse=_whole, check=_at_least_one)
    origin_inflight: int = _setting(
        512 * MiB, flag="--origin-inflight", env="WARMSTART_ORIGIN_INFLIGHT",
        help="memory budget per origin host: bytes of range requests in flight that are not yet written; "
             "range size is this divided by the window (1MiB to 64MiB)",
        form=f"a size from {show_size(MIN_INFLIGHT)} to {show_size(MAX_INFLIGHT)}",
        parse=_size, check=_inflight_check, show=show_size)
    open_files: int = _setting(
        256, flag="--open-files", env="WARMSTART_OPEN_FILES",
        help="the most files the agent fills at once (each holds a file descriptor while it is open); a model "
             "of more files is filled that many at a time, so its size in files bounds neither descriptors nor "
             "memory",
        form="a whole number of at least 8", parse=_whole, check=_at_least(8))
    retries: int = _setting(
        6, flag="--retries", env="WARMSTART_RETRIES",
        help="tries per piece against the origin (backoff with jitter between them)",
        form="a whole number of at least 1", parse=_whole, check=_at_least_one)
    read_timeout: float = _setting(
        30.0, flag="--read-timeout", env="WARMSTART_READ_TIMEOUT",
        help="seconds an origin or peer body may stall before the request is retried",
        form="a number of seconds above 0", parse=_seconds, check=_positive_seconds)
    resolve_timeout: float = _setting(
        5.0, flag="--resolve-timeout", env="WARMSTART_RESOLVE_TIMEOUT",
        help="seconds a moving reference (no @revision) waits for its origin when a complete revision of it is "
             "cached; past it, or when the origin refuses or fails, that revision is served (marked stale)",
        form="a number of seconds above 0", parse=_seconds, check=_positive_seconds)
    drop_behind: bool = _setting(
        False, flag="--drop-behind", env="WARMSTART_DROP_BEHIND",
        help="write back and drop fetched blobs from the page cache as they are verified, so a prefetch does "
             "not fill RAM (or the agent's memory limit) with a second copy of the model",
        form="--drop-behind / --no-drop-behind, or 1/true/yes/on, 0/false/no/off in the variable",
        parse=_yes_no, check=_bool_check, show=lambda v: "on" if v else "off", boolean=True)
    allow_private_redirects: bool = _setting(
        False, flag="--allow-private-redirects", env="WARMSTART_ALLOW_PRIVATE_REDIRECTS",
        help="let origin redirects, and https references a peer names, reach loopback, link-local and private "
             "addresses (an in-cluster S3 or mirror behind a redirect); off: only public ones. The configured "
             "endpoints (AWS_ENDPOINT_URL, HF_ENDPOINT) and references given on the local socket are trusted "
             "either way",
        form="--allow-private-redirects / --no-allow-private-redirects, or 1/true/yes/on, 0/false/no/off in "
             "the variable",
        parse=_yes_no, check=_bool_check, show=lambda v: "on" if v else "off", boolean=True)
    socket_mode: int = _setting(
        0o660, flag="--socket-mode", env="WARMSTART_SOCKET_MODE",
        help="octal permissions of the local socket (660: owner and group only)",
        form="octal permissions from 000 to 777, like 660", parse=_octal_mode, check=_mode_check,
        show=lambda v: oct(v)[2:])
    socket_gid: int | None = _setting(
        None, flag="--socket-group", env="WARMSTART_SOCKET_GROUP",
        help="group (name or gid) that owns the local socket: the pods allowed to use it",
        form="an existing group name or a gid", parse=_group, check=_gid_check,
        show=_none_or("the agent's own group"))
    # Peers (agent/peers/membership.py): off unless a token file is given.
    peers: tuple[str, ...] = _setting(
        (), flag="--peers", env="WARMSTART_PEERS",
        help="static peer list (this node's own address is ignored); needs --peer-token-file",
        form="HOST:PORT,HOST:PORT,... with ports from 1 to 65535", parse=_peer_list, check=_peer_list_check,
        show=lambda v: ",".join(v) or "none")
    peer_dns: str | None = _setting(
        None, flag="--peer-dns", env="WARMSTART_PEER_DNS",
        help="DNS name listing the peers (a Kubernetes headless Service), port = --listen's; needs --peer-token-file",
        form="a DNS name without a port", parse=_optional_text, check=_dns_name_check, show=_none_or("none"))
    peer_dns_interval: float = _setting(
        10.0, flag="--peer-dns-interval", env="WARMSTART_PEER_DNS_INTERVAL",
        help="seconds between lookups of --peer-dns",
        form="a number of seconds above 0", parse=_seconds, check=_positive_seconds)
    peer_token_file: str | None = _setting(
        None, flag="--peer-token-file", env="WARMSTART_PEER_TOKEN_FILE",
        help="file with the shared peer token (a mounted Secret); peers are off without it",
        form="a readable file holding a token of 16 or more characters", parse=_optional_text,
        check=_optional_path_check, show=_none_or("none (peers off)"))
    advertise: str | None = _setting(
        None, flag="--advertise", env="WARMSTART_ADVERTISE",
        help="address other nodes know this one by",
        form="HOST:PORT with a port from 1 to 65535", parse=_optional_text, check=_optional_hostport_check,
        show=_none_or("--listen's, unless its host is 0.0.0.0"))
    peer_hedge_timeout: float = _setting(
        2.0, flag="--peer-hedge-timeout", env="WARMSTART_PEER_HEDGE_TIMEOUT",
        help="seconds to wait for a peer's answer before asking the next owner",
        form="a number of seconds above 0", parse=_seconds, check=_positive_seconds)
    peer_start_wait: float = _setting(
        5.0, flag="--peer-start-wait", env="WARMSTART_PEER_START_WAIT",
        help="at start-up, seconds readiness and fills wait for every peer to answer once (0: do not wait)",
        form="a number of seconds from 0 to 600", parse=_seconds, check=_wait_seconds)
    # Trust (agent/peers/tls.py, agent/artifacts/signing.py).
    peer_tls_dir: str | None = _setting(
        None, flag="--peer-tls-dir", env="WARMSTART_PEER_TLS_DIR",
        help="directory holding tls.crt, tls.key and ca.crt (a cert-manager Certificate's Secret): the --listen "
             "port speaks HTTPS and peers are served and asked over mutually verified TLS; needs "
             "--peer-token-file and --peer-tls-name",
        form="a directory with tls.crt, tls.key and ca.crt (PEM)", parse=_optional_text,
        check=_optional_path_check, show=_none_or("none (peer traffic in clear)"))
    peer_tls_name: str | None = _setting(
        None, flag="--peer-tls-name", env="WARMSTART_PEER_TLS_NAME",
        help="DNS name every peer's certificate must carry (in its subjectAltName), checked both ways; with "
             "--peer-tls-dir",
        form="a DNS name", parse=_optional_text, check=_dns_name_check, show=_none_or("none"))
    peer_tls_reload: float = _setting(
        60.0, flag="--peer-tls-reload", env="WARMSTART_PEER_TLS_RELOAD",
        help="seconds between looks at --peer-tls-dir's files: a renewed set (cert-manager) is loaded for new "
             "connections without a restart, an unusable one is logged and the old one kept (0: read at start "
             "only)",
        form="a number of seconds, 0 or above", parse=_seconds, check=_off_or_positive_seconds)
    artifact_trust: str = _setting(
        "off", flag="--artifact-trust", env="WARMSTART_ARTIFACT_TRUST",
        help="which compile-artifact bundles from peers this node loads (they are code it runs): off = none, "
             "signed = only those signed by a key of --artifact-trusted-keys, token = any peer holding the peer "
             "token",
        form="off, signed or token", parse=_lower, check=_one_of("off", "signed", "token"))
    artifact_signing_key: str | None = _setting(
        None, flag="--artifact-signing-key", env="WARMSTART_ARTIFACT_SIGNING_KEY",
        help="ed25519 private key (PEM, a mounted Secret) this node signs the bundles pushed to it with; give it "
             "to publishing nodes only",
        form="a readable PEM file of an unencrypted ed25519 private key", parse=_optional_text,
        check=_optional_path_check, show=_none_or("none (bundles published here are unsigned)"))
    artifact_trusted_keys: str | None = _setting(
        None, flag="--artifact-trusted-keys", env="WARMSTART_ARTIFACT_TRUSTED_KEYS",
        help="ed25519 public keys (PEM file, or a directory of them) whose signatures --artifact-trust signed "
             "accepts",
        form="a PEM file or directory of ed25519 public keys", parse=_optional_text,
        check=_optional_path_check, show=_none_or("none"))
    # The declarative warm set (agent/warmset/reconciler.py): a YAML file, watched every warm_set_poll seconds.
    warm_set: str | None = _setting(
        None, flag="--warm-set", env="WARMSTART_WARM_SET",
        help="YAML file of models to keep warm (a mounted ConfigMap; edits apply without a restart)",
        form="a file path", parse=_warm_set_file, check=_optional_path_check, show=_none_or("none"))
    warm_set_poll: float = _setting(
        0.5, flag="--warm-set-poll", env="WARMSTART_WARM_SET_POLL",
        help="seconds between looks at the warm-set file",
        form="a number of seconds above 0", parse=_seconds, check=_positive_seconds)
    log_level: str = _setting(
        "INFO", flag="--log-level", env="WARMSTART_LOG_LEVEL",
        help="least severe log records written to stderr",
        form="one of " + ", ".join(LOG_LEVELS) + " (any case)", parse=_log_level, check=_log_level_check)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`SettingError` for the first unusable value, then for combinations that cannot work."""
        for f in fields(self):
            setting = f.metadata["setting"]
            problem = setting.check(getattr(self, f.name))
            if problem is not None:
                raise SettingError(setting, problem)
        if (self.peers or self.peer_dns) and not self.peer_token_file:
            raise SettingError(setting_of("peer_token_file"), "--peers/--peer-dns were given without it")
        if self.peer_token_file:
            from agent.peers.membership import read_token  # only with peers on: the verbs never get here

            try:
                read_token(self.peer_token_file)
            except ValueError as exc:
                problem = str(exc).replace("--peer-token-file ", "")
                raise SettingError(setting_of("peer_token_file"), problem) from None
        tls = self.peer_tls_problem()
        if tls is not None:
            raise SettingError(setting_of(tls[0]), tls[1])
        trust = self.artifact_trust_problem()
        if trust is not None:
            raise SettingError(setting_of(trust[0]), trust[1])

    def peer_tls_problem(self) -> tuple[str, str] | None:
        """(field, problem) when the peer TLS settings cannot work together or the directory is unusable."""
        if self.peer_tls_name and not self.peer_tls_dir:
            return "peer_tls_dir", "--peer-tls-name was given without it"
        if not self.peer_tls_dir:
            return None
        if not self.peer_token_file:
            return "peer_tls_dir", "TLS is for the peer API, which is off without --peer-token-file"
        if not self.peer_tls_name:
            return "peer_tls_name", "--peer-tls-dir needs the name peers' certificates carry"
        from agent.peers.tls import PeerTLS, PeerTLSError  # only with TLS set

        try:
            PeerTLS.load(self.peer_tls_dir, self.peer_tls_name)
        except PeerTLSError as exc:
            return "peer_tls_dir", str(exc)
        return None

    def artifact_trust_problem(self) -> tuple[str, str] | None:
        """(field, problem) when the trust settings cannot work together or their key files are unusable."""
        if self.artifact_trust == "signed" and not self.artifact_trusted_keys:
            return "artifact_trusted_keys", "--artifact-trust signed needs it"
        if not self.artifact_signing_key and not self.artifact_trusted_keys:
            return None
        from agent.artifacts.signing import KeyFileError, load_signing_key, load_trusted_keys  # only with keys set

        try:
            if self.artifact_signing_key:
                load_signing_key(self.artifact_signing_key)
        except KeyFileError as exc:
            return "artifact_signing_key", str(exc)
        try:
            if self.artifact_trusted_keys:
                load_trusted_keys(self.artifact_trusted_keys)
        except KeyFileError as exc:
            return "artifact_trusted_keys", str(exc)
        return None

    @property
    def listen_address(self) -> tuple[str, int]:
        """``listen`` as (host, port): an empty host is 0.0.0.0, ``[v6]`` loses its brackets."""
        host, port = split_hostport(self.listen, host_required=False)
        return host or "0.0.0.0", port

    @classmethod
    def from_texts(cls, given: Mapping[str, Any], environ: Mapping[str, str]) -> AgentConfig:
        """Build from what a user typed: ``given`` maps field names to a flag's text (or a bool for a yes/no
        flag; None or absent: not given), then the ``WARMSTART_*`` variable (empty counts as unset), then the
        default. A value that does not parse raises :class:`SettingError` like a value that does not check."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            setting: Setting = f.metadata["setting"]
            text, source = given.get(f.name), ""
            if text is None:
                text, source = environ.get(setting.env) or None, f" from {setting.env}"
            if text is None:
                continue
            if isinstance(text, bool):
                values[f.name] = text
                continue
            try:
                value = setting.parse(text)
            except ValueError:
                value = None
                problem: str | None = "unparsable"
            else:
                problem = setting.check(value)
            if problem is not None:  # named as typed: 'verbose', not the 'VERBOSE' it parsed to
                raise SettingError(setting, f"got {text!r}{source}")
            values[f.name] = value
        return cls(**values)


def settings() -> list[tuple[str, Setting, Any]]:
    """The table: (field name, setting, default) for every ``agent serve`` flag, in help order."""
    return [(f.name, f.metadata["setting"], f.default) for f in fields(AgentConfig)]


def setting_of(name: str) -> Setting:
    """The row of field ``name``."""
    return next(s for n, s, _ in settings() if n == name)
