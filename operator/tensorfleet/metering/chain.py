"""Hash chain and Ed25519 signatures over usage records and checkpoints.

* A record's body is canonical JSON (sorted keys, no spaces, UTF-8). It carries ``ledger``, ``seq`` and
  ``prevHash``; its hash is ``sha256(body)``, so each hash commits to the whole history before it.
* The first record's ``prevHash`` is the ledger's genesis hash, ``sha256("tensorfleet.usage.genesis.v1\\n"
  + ledger id)``.
* Signatures are Ed25519 over a domain-separated message: ``"tensorfleet.usage.record.v1\\n" + hash``
  for records and ``"tensorfleet.usage.checkpoint.v1\\n" + sha256(body)`` for checkpoints, so one can
  never stand for the other.
* A checkpoint ``{ledger, seq, head, time, keyId, publicKey}`` says "this ledger had ``seq`` records and
  the last one hashed to ``head``"; exported with the records, it makes a cut-off tail detectable.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

RECORD_DOMAIN = b"tensorfleet.usage.record.v1\n"
CHECKPOINT_DOMAIN = b"tensorfleet.usage.checkpoint.v1\n"
TOO_DEEP = "JSON nested too deeply"
GENESIS_DOMAIN = b"tensorfleet.usage.genesis.v1\n"


def canonical(body: Any) -> str:
    """ValueError on NaN, an infinity, or nesting too deep to encode."""
    try:
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except RecursionError:
        raise ValueError(TOO_DEEP) from None


def parse(text: str) -> Any:
    """The JSON value of ``text`` from a file given to verify or report; ValueError where it is not JSON or is
    nested too deeply for the parser (a corrupt or hostile file), never a RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(TOO_DEEP) from None


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def genesis_hash(ledger_id: str) -> str:
    return hashlib.sha256(GENESIS_DOMAIN + ledger_id.encode()).hexdigest()


def public_key_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    return hashlib.sha256(public_key_raw(key)).hexdigest()[:16]


class Signer:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = key.public_key()
        self.key_id = key_id(self.public_key)
        self.public_key_b64 = base64.b64encode(public_key_raw(self.public_key)).decode()

    def sign_record(self, record_hash: str) -> str:
        return base64.b64encode(self._key.sign(RECORD_DOMAIN + bytes.fromhex(record_hash))).decode()

    def sign_checkpoint(self, body_text: str) -> str:
        digest = hashlib.sha256(body_text.encode()).digest()
        return base64.b64encode(self._key.sign(CHECKPOINT_DOMAIN + digest)).decode()


class Verifier:
    def __init__(self, key: Ed25519PublicKey) -> None:
        self._key = key
        self.key_id = key_id(key)

    def record_ok(self, record_hash: str, signature: str) -> bool:
        return self._ok(RECORD_DOMAIN + bytes.fromhex(record_hash), signature)

    def checkpoint_ok(self, body_text: str, signature: str) -> bool:
        return self._ok(CHECKPOINT_DOMAIN + hashlib.sha256(body_text.encode()).digest(), signature)

    def _ok(self, message: bytes, signature: str) -> bool:
        try:
            self._key.verify(base64.b64decode(signature, validate=True), message)
        except (InvalidSignature, ValueError):
            return False
        return True


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM (PKCS#8, as ``openssl genpkey -algorithm ed25519`` writes it)."""
    data = Path(path).read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: the key is {type(key).__name__}, expected Ed25519")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (SubjectPublicKeyInfo), or the public half of a private key file."""
    data = Path(path).read_bytes()
    try:
        key: Any = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: the key is {type(key).__name__}, expected Ed25519")
    return key


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(text))


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()
