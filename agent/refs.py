"""Model references: the untrusted strings users type, parsed into a checked value.

Forms accepted (see README "Model references"):

    s3://BUCKET/PREFIX[@REVISION]     every object under PREFIX/ (or the object PREFIX)
    gs://BUCKET/PREFIX[@REVISION]     the same in Google Cloud Storage
    az://ACCOUNT/CONTAINER/PREFIX[@REVISION]  the same in Azure Blob Storage
    hf://ORG/NAME[@REVISION]          a Hugging Face model repo; REVISION a branch, tag or commit
    https://HOST/PATH[@REVISION]      one file (http:// too, for mirrors inside a cluster)
    /ABS/DIR  or  file:///ABS/DIR     a local or NFS directory (or one file)

``@REVISION`` pins what the reference resolves to: for hf:// it is the usual
branch/tag/commit; for the others it is the revision id the agent printed when it
resolved the reference (a digest of the listing), so a pinned reference never
silently changes content.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from client.errors import BadReferenceError

MAX_REF_LENGTH = 1024
_SCHEMES = ("s3", "gs", "az", "hf", "https", "http", "file")
_GCS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._\-]{1,220}[a-z0-9]$")
_AZ_ACCOUNT = re.compile(r"^[a-z0-9]{3,24}$")
_AZ_CONTAINER = re.compile(r"^[a-z0-9](?!.*--)[a-z0-9\-]{1,61}[a-z0-9]$")
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_HF_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,127}$")
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9a-fA-F:]+\](:[0-9]{1,5})?$")


@dataclass(frozen=True)
class ModelRef:
    """A parsed, validated model reference.

    ``location`` is scheme-specific: ``bucket/prefix`` for s3 and gs,
    ``account/container/prefix`` for az, ``org/name`` for hf,
    ``host/path`` for http(s), an absolute path for file.
    """

    scheme: str
    location: str
    revision: str | None = None

    @property
    def base(self) -> str:
        """The reference without its revision: what `agent ls` groups by."""
        if self.scheme == "file":
            return self.location
        return f"{self.scheme}://{self.location}"

    def __str__(self) -> str:
        return self.base + (f"@{self.revision}" if self.revision else "")

    @property
    def key(self) -> str:
        """A filesystem-safe, unique, human-readable name for this reference's base."""
        readable = re.sub(r"[^A-Za-z0-9._\-]+", "--", self.location).strip("-.")[:80]
        digest = hashlib.sha256(self.base.encode()).hexdigest()[:10]
        return f"{self.scheme}--{readable}--{digest}"


def _check_path_segments(path: str, what: str, ref: str) -> None:
    for seg in path.split("/"):
        if seg in ("..", "."):
            raise BadReferenceError(f"{what} in {ref!r} contains {seg!r}; use a plain path")
    if any(ord(c) < 0x20 or c == "\x7f" for c in path):
        raise BadReferenceError(f"{what} in {ref!r} contains control characters")


def _split_revision(rest: str, ref: str) -> tuple[str, str | None]:
    if "@" not in rest:
        return rest, None
    loc, rev = rest.rsplit("@", 1)
    if not _REVISION.match(rev) or ".." in rev:
        raise BadReferenceError(f"bad revision {rev!r} in {ref!r}")
    return loc, rev


def parse_ref(ref: object) -> ModelRef:
    """Parse and validate a reference; raise BadReferenceError with a one-line reason."""
    if not isinstance(ref, str) or not ref.strip():
        raise BadReferenceError("model reference must be a non-empty string")
    ref = ref.strip()
    if len(ref) > MAX_REF_LENGTH:
        raise BadReferenceError(f"model reference is {len(ref)} characters; the limit is {MAX_REF_LENGTH}")
    if ref.startswith("/"):
        return _parse_file(ref, ref)
    if "://" not in ref:
        raise BadReferenceError(
            f"cannot tell what {ref!r} is: use s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, az://ACCOUNT/CONTAINER/PREFIX, "
            "hf://ORG/NAME, https://URL or an absolute path"
        )
    scheme, rest = ref.split("://", 1)
    scheme = scheme.lower()
    if scheme not in _SCHEMES:
        raise BadReferenceError(f"unknown scheme {scheme!r} in {ref!r}; known: {', '.join(_SCHEMES)}")
    if scheme == "file":
        return _parse_file(rest, ref)
    if scheme == "s3":
        return _parse_s3(rest, ref)
    if scheme == "gs":
        return _parse_gs(rest, ref)
    if scheme == "az":
        return _parse_az(rest, ref)
    if scheme == "hf":
        return _parse_hf(rest, ref)
    return _parse_http(scheme, rest, ref)


def _parse_file(path: str, ref: str) -> ModelRef:
    if not path.startswith("/"):
        raise BadReferenceError(f"local path in {ref!r} must be absolute")
    path, rev = _split_revision(path, ref) if re.search(r"@[A-Za-z0-9._\-]+$", path) else (path, None)
    _check_path_segments(path, "path", ref)
    path = "/" + "/".join(s for s in path.split("/") if s)
    return ModelRef("file", path, rev)


def _parse_s3(rest: str, ref: str) -> ModelRef:
    rest, rev = _split_revision(rest, ref)
    bucket, _, prefix = rest.partition("/")
    if not _S3_BUCKET.match(bucket):
        raise BadReferenceError(f"bad S3 bucket name {bucket!r} in {ref!r}")
    prefix = prefix.strip("/")
    if not prefix:
        raise BadReferenceError(f"{ref!r} names a whole bucket; give a prefix or key: s3://{bucket}/PREFIX")
    _check_path_segments(prefix, "key", ref)
    return ModelRef("s3", f"{bucket}/{prefix}", rev)


def _parse_gs(rest: str, ref: str) -> ModelRef:
    rest, rev = _split_revision(rest, ref)
    bucket, _, prefix = rest.partition("/")
    if not _GCS_BUCKET.match(bucket) or ".." in bucket:
        raise BadReferenceError(f"bad GCS bucket name {bucket!r} in {ref!r}")
    prefix = prefix.strip("/")
    if not prefix:
        raise BadReferenceError(f"{ref!r} names a whole bucket; give a prefix or object: gs://{bucket}/PREFIX")
    _check_path_segments(prefix, "object name", ref)
    return ModelRef("gs", f"{bucket}/{prefix}", rev)


def _parse_az(rest: str, ref: str) -> ModelRef:
    rest, rev = _split_revision(rest, ref)
    account, _, rest = rest.partition("/")
    container, _, prefix = rest.partition("/")
    if not _AZ_ACCOUNT.match(account):
        raise BadReferenceError(f"bad Azure storage account {account!r} in {ref!r} (3-24 lowercase letters, digits)")
    if not _AZ_CONTAINER.match(container):
        raise BadReferenceError(f"bad Azure container name {container!r} in {ref!r}")
    prefix = prefix.strip("/")
    if not prefix:
        raise BadReferenceError(
            f"{ref!r} names a whole container; give a prefix or blob: az://{account}/{container}/PREFIX"
        )
    _check_path_segments(prefix, "blob name", ref)
    return ModelRef("az", f"{account}/{container}/{prefix}", rev)


def _parse_hf(rest: str, ref: str) -> ModelRef:
    rest, rev = _split_revision(rest, ref)
    parts = rest.strip("/").split("/")
    if len(parts) not in (1, 2) or not all(_HF_PART.match(p) and ".." not in p for p in parts):
        raise BadReferenceError(f"bad Hugging Face repo id in {ref!r}; expected hf://ORG/NAME[@REVISION]")
    return ModelRef("hf", "/".join(parts), rev)


def _parse_http(scheme: str, rest: str, ref: str) -> ModelRef:
    rest, rev = _split_revision(rest, ref) if re.search(r"@[A-Za-z0-9._\-]+$", rest) else (rest, None)
    host, _, path = rest.partition("/")
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host
    if "@" in host or not _HOST.match(host) or ".." in name or name.startswith((".", "-")):
        raise BadReferenceError(f"bad host {host!r} in {ref!r}")
    if not path or path.endswith("/"):
        raise BadReferenceError(f"{ref!r} must name one file")
    if "?" in path or "#" in path:
        raise BadReferenceError(f"{ref!r}: query strings and fragments are not supported")
    _check_path_segments(path, "path", ref)
    return ModelRef(scheme, f"{host}/{path}", rev)


def check_relative_path(path: str, what: str = "file name") -> str:
    """Validate a file path inside a model (from an origin listing): relative, no traversal."""
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        raise BadReferenceError(f"unsafe {what} {path!r} in model listing")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or len(path) > 1024:
        raise BadReferenceError(f"unsafe {what} {path!r} in model listing")
    return path
