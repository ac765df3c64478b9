"""Which compile-artifact bundles from peers this node loads: ``--artifact-trust`` and ed25519 signatures.

A bundle is code: Inductor's cache holds Python and kernels that every node
restoring it runs. The peer token only says a request comes from a member of
the cluster, so with it alone any holder of the token could publish a bundle
that every node loads. ``--artifact-trust`` decides what a bundle from a peer
needs before this node stores and lists it:

    off      bundles from peers are never loaded (the default); local pushes work as before
    signed   the peer's entry must carry an ed25519 signature by one of ``--artifact-trusted-keys``
    token    any peer holding the token (the behaviour before this setting)

What is signed is the bundle's identity and content, never a name alone: the
artifact key, the full fingerprint, the size, the xxh128 the store names the
blob by and a SHA-256 of the bytes (xxh128 is fast but not collision-resistant;
the SHA-256 is what makes a forged bundle under a signed entry impossible).
The receiver checks the signature before it asks for the blob, then hashes the
blob with both as it lands and keeps it only if both match (Store.adopt_stream).

Signing happens on publishing nodes only (``--artifact-signing-key``, a PEM
private key in a Secret mounted there); the other nodes hold only public keys.
A bundle restored from a peer keeps its publisher's signature, so it can be
passed on. Keys are PEM as ``openssl genpkey -algorithm ed25519`` and
``openssl pkey -pubout`` write them; a key's id is the first 16 hex
characters of the SHA-256 of its raw 32 bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

TRUST_MODES = ("off", "signed", "token")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")
MAX_SIGNATURE = 128  # base64 of 64 bytes is 88 characters
MAX_KEY_FILE = 1024 * 1024
_PEM_PUBLIC = re.compile(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.S)
# Why a bundle from a peer was not loaded: the values of warmstart_artifact_refused_total{reason}.
REFUSAL_REASONS = ("unsigned", "untrusted_key", "bad_signature", "digest_mismatch")


class KeyFileError(ValueError):
    """A key file cannot be used; the message says which file and why (shown as a setting's problem)."""


def signed_bytes(key: str, fingerprint: dict[str, str], size: int, xxh128: str, sha256: str) -> bytes:
    """The exact bytes a signature covers: one canonical JSON text, versioned so the format can change."""
    doc = {"v": 1, "key": key, "fingerprint": fingerprint, "size": size, "xxh128": xxh128, "sha256": sha256}
    return b"warmstart-artifact\n" + json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE:
        raise KeyFileError(f"{path} is larger than a key file")
    return data


def load_signing_key(path: str) -> Ed25519PrivateKey:
    """The ed25519 private key in PEM file ``path`` (unencrypted PKCS#8)."""
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an ed25519 key")
    return key


def load_trusted_keys(path: str) -> dict[str, Ed25519PublicKey]:
    """The ed25519 public keys in ``path``: a PEM file of one or more keys, or a directory of such files.

    A directory is what a Secret mounts (one file per key); its dot-files (the
    Secret's ``..data`` links) are skipped.
    """
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if not n.startswith("."))
        files = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
    else:
        files = [path]
    keys: dict[str, Ed25519PublicKey] = {}
    for name in files:
        blocks = _PEM_PUBLIC.findall(_read(name))
        if not blocks:
            raise KeyFileError(f"{name} holds no PEM public key (-----BEGIN PUBLIC KEY-----)")
        for block in blocks:
            try:
                public = serialization.load_pem_public_key(block)
            except ValueError as exc:
                raise KeyFileError(f"{name}: unreadable public key ({exc})") from None
            if not isinstance(public, Ed25519PublicKey):
                raise KeyFileError(f"{name} holds a {type(public).__name__}, not an ed25519 key")
            keys[key_id(public)] = public
    if not keys:
        raise KeyFileError(f"{path} holds no public key")
    return keys


@dataclass(frozen=True)
class Signature:
    """A bundle's signature as an index entry carries it: base64 of the 64 bytes, and the signer's key id."""

    signature: str = ""
    signer: str = ""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Signature:
        """Read from an entry (disk or peer); ValueError when malformed. Absent fields: unsigned."""
        sig, signer = data.get("signature", ""), data.get("signer", "")
        if not isinstance(sig, str) or not isinstance(signer, str) or len(sig) > MAX_SIGNATURE:
            raise ValueError("bad artifact entry: signature")
        if (sig or signer) and not KEY_ID_RE.match(signer):
            raise ValueError("bad artifact entry: signer must be a key id (16 hex characters)")
        return cls(sig, signer)


@dataclass(frozen=True)
class ArtifactTrust:
    """The node's trust setting: what it signs with, and what it accepts from peers."""

    mode: str = "off"
    signing_key: Ed25519PrivateKey | None = None
    trusted: dict[str, Ed25519PublicKey] = field(default_factory=dict)

    @classmethod
    def from_files(cls, mode: str, signing_key: str | None, trusted_keys: str | None) -> ArtifactTrust:
        """Load the keys named by the settings (blocking file reads: at start, before the loop serves)."""
        return cls(
            mode,
            load_signing_key(signing_key) if signing_key else None,
            load_trusted_keys(trusted_keys) if trusted_keys else {},
        )

    @property
    def peers_allowed(self) -> bool:
        return self.mode != "off"

    def sign(self, key: str, fingerprint: dict[str, str], size: int, xxh128: str, sha256: str) -> Signature:
        """This node's signature of a bundle it publishes; unsigned without ``--artifact-signing-key``."""
        if self.signing_key is None:
            return Signature()
        raw = self.signing_key.sign(signed_bytes(key, fingerprint, size, xxh128, sha256))
        return Signature(base64.b64encode(raw).decode("ascii"), key_id(self.signing_key.public_key()))

    def refusal(self, key: str, fingerprint: dict[str, str], size: int, xxh128: str, sha256: str,
                sig: Signature) -> str | None:
        """Why a peer's entry may not be loaded here (one of REFUSAL_REASONS), or None when it may."""
        if self.mode == "token":
            return None
        if self.mode != "signed":
            raise AssertionError("peer artifacts are off: no entry is asked for")
        if not sig.signature or not SHA256_RE.match(sha256):
            return "unsigned"
        public = self.trusted.get(sig.signer)
        if public is None:
            return "untrusted_key"
        try:
            public.verify(base64.b64decode(sig.signature, validate=True),
                          signed_bytes(key, fingerprint, size, xxh128, sha256))
        except (InvalidSignature, binascii.Error, ValueError):
            return "bad_signature"
        return None
