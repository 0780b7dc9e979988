"""Signed bundles: an Ed25519 signature of manifest.json in `manifest.json.sig`, keys as PEM files.

Why: the manifest holds the sha256 of every file of a bundle, so whoever rewrites files and manifest
together passes the hash checks; a signature by a key the hospital trusts is what proves who built it.

- `bedside keygen --out PATH` (write_keypair): PATH, the private key (PKCS#8 PEM, unencrypted, mode
  0600), and PATH.pub, the public key (SubjectPublicKeyInfo PEM); never overwrites either.
- `bedside deploy --sign-key PATH` (sign_manifest): signs the exact bytes of manifest.json.
- `bedside verify --trusted-key PATH.pub` (signature_check): the `signature` check fails for an
  unsigned bundle, a signature by another key, or a manifest changed after signing, naming which.

`manifest.json.sig` is JSON: {"algorithm": "ed25519", "signed_file": "manifest.json",
"public_key_sha256": sha256 of the signer's raw 32-byte public key (unauthenticated: it only names
the signer in a failure), "signature": base64 of the 64-byte signature}.
Bad key files (missing, not PEM, not Ed25519, encrypted) are a BedsideError (exit 2).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from toolkit.core.errors import BedsideError
from toolkit.validate.checks import Check

SIGNED_FILE = "manifest.json"
SIGNATURE = "manifest.json.sig"
ALGORITHM = "ed25519"
PUBLIC_SUFFIX = ".pub"
MAX_KEY_BYTES = 64 * 1024
MAX_SIGNATURE_BYTES = 64 * 1024


def key_fingerprint(public_key: Ed25519PublicKey) -> str:
    """Hex sha256 of the raw 32-byte public key: how keygen, deploy and verify name a key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _read_key_file(path: Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise BedsideError(f"{what} '{path}' not found: pass a PEM file written by `bedside keygen`")
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_KEY_BYTES + 1)
    except OSError as error:
        raise BedsideError(f"{what} '{path}' cannot be read ({error.strerror or error})") from None
    if len(data) > MAX_KEY_BYTES or b"-----BEGIN " not in data:
        raise BedsideError(f"{what} '{path}' is not a PEM key file: pass a file written by `bedside keygen`")
    return data


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key of a PEM file (`bedside keygen`'s PATH); BedsideError otherwise."""
    data = _read_key_file(path, "signing key")
    if b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise BedsideError(
            f"signing key '{path}' is a public key: --sign-key takes the private key (keygen's PATH, not PATH.pub)"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise BedsideError(
            f"signing key '{path}' is encrypted: Bedside reads unencrypted PEM keys (`bedside keygen`)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as error:
        raise BedsideError(f"signing key '{path}' is not a readable PEM private key ({error})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BedsideError(
            f"signing key '{path}' is a {type(key).__name__.lstrip('_')}, not an Ed25519 key: "
            "make one with `bedside keygen`"
        )
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key of a PEM file (`bedside keygen`'s PATH.pub); BedsideError otherwise."""
    data = _read_key_file(path, "trusted key")
    if b"PRIVATE KEY-----" in data:
        raise BedsideError(
            f"trusted key '{path}' is a private key: --trusted-key takes the public key ({Path(path).name}.pub); "
            "the private key should never leave the build host"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as error:
        raise BedsideError(f"trusted key '{path}' is not a readable PEM public key ({error})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BedsideError(
            f"trusted key '{path}' is a {type(key).__name__.lstrip('_')}, not an Ed25519 key: "
            "pass the .pub file of `bedside keygen`"
        )
    return key


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to a new file `path` atomically (temporary, fsync, hard link): FileExistsError if it exists."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            os.fchmod(stream.fileno(), mode)
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.link(temporary, path)  # unlike a rename, never replaces an existing file
    finally:
        Path(temporary).unlink(missing_ok=True)


def write_keypair(out: Path) -> tuple[Path, Path, str]:
    """A new Ed25519 key pair: `out` (private PEM, 0600) and `out`.pub (public PEM, 0644); returns both and the fingerprint.

    Refuses (BedsideError) when either file exists; an interrupted run leaves no half key.
    """
    private_path = Path(out)
    public_path = private_path.with_name(private_path.name + PUBLIC_SUFFIX)
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise BedsideError(f"'{path}' exists: keygen never overwrites a key; choose another --out")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        private_path.parent.mkdir(parents=True, exist_ok=True)
        _write_new_file(private_path, private_pem, 0o600)
    except FileExistsError:
        raise BedsideError(
            f"'{private_path}' exists: keygen never overwrites a key; choose another --out"
        ) from None
    except OSError as error:
        raise BedsideError(f"cannot write key '{private_path}' ({error.strerror or error})") from None
    try:
        _write_new_file(public_path, public_pem, 0o644)
    except OSError as error:
        private_path.unlink(missing_ok=True)  # ours: written just above
        if isinstance(error, FileExistsError):
            raise BedsideError(
                f"'{public_path}' exists: keygen never overwrites a key; choose another --out"
            ) from None
        raise BedsideError(f"cannot write key '{public_path}' ({error.strerror or error})") from None
    return private_path, public_path, key_fingerprint(key.public_key())


def signature_record(manifest_bytes: bytes, key: Ed25519PrivateKey) -> dict[str, Any]:
    """The content of manifest.json.sig for these exact manifest bytes."""
    return {
        "algorithm": ALGORITHM,
        "signed_file": SIGNED_FILE,
        "public_key_sha256": key_fingerprint(key.public_key()),
        "signature": base64.b64encode(key.sign(manifest_bytes)).decode("ascii"),
    }


def sign_manifest(folder: Path, key: Ed25519PrivateKey) -> Path:
    """Sign `folder`/manifest.json into `folder`/manifest.json.sig; returns the signature's path."""
    record = signature_record((folder / SIGNED_FILE).read_bytes(), key)
    path = folder / SIGNATURE
    path.unlink(missing_ok=True)
    _write_new_file(path, (json.dumps(record, indent=2) + "\n").encode("utf-8"), 0o644)
    return path


def _failed(detail: str) -> Check:
    return Check("signature", False, None, None, "", detail=detail)


def signature_check(folder: Path, manifest_bytes: bytes, trusted: Ed25519PublicKey) -> Check:
    """`signature`: manifest.json.sig in `folder` is the trusted key's signature of `manifest_bytes`."""
    trusted_id = key_fingerprint(trusted)
    path = folder / SIGNATURE
    if path.is_symlink() or (path.exists() and not path.is_file()):
        return _failed(f"{SIGNATURE} is not a regular file: refused")
    if not path.exists():
        return _failed(
            f"the bundle is unsigned: no {SIGNATURE} (the trusted key {trusted_id[:16]} signed nothing)"
        )
    try:
        with path.open("rb") as stream:
            raw = stream.read(MAX_SIGNATURE_BYTES + 1)
        record = json.loads(raw) if len(raw) <= MAX_SIGNATURE_BYTES else None
        if not isinstance(record, dict) or not isinstance(record.get("signature"), str):
            raise ValueError("not a signature record")
        signature = base64.b64decode(record["signature"], validate=True)
    except (OSError, ValueError, binascii.Error):
        return _failed(f"{SIGNATURE} is malformed: not a Bedside signature record")
    algorithm = record.get("algorithm")
    signer = record.get("public_key_sha256")
    if algorithm != ALGORITHM:
        return _failed(f"{SIGNATURE} uses algorithm {algorithm!r}, not {ALGORITHM}")
    try:
        trusted.verify(signature, manifest_bytes)
    except InvalidSignature:
        if signer == trusted_id:
            return _failed(
                f"{SIGNED_FILE} was changed after signing: the signature of key {trusted_id[:16]} does not match it"
            )
        return _failed(f"signed by another key ({str(signer)[:16]}), not the trusted key ({trusted_id[:16]})")
    return Check(
        "signature", True, None, None, "", detail=f"{SIGNED_FILE} signed by the trusted key {trusted_id[:16]}"
    )
