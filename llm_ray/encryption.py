"""Client-side encryption at rest: AES-256-GCM (``cryptography``), one file at a time.

An encrypted file is ``MAGIC || nonce (12 bytes) || ciphertext || tag (16 bytes)``, with the
file's name inside its folder as associated data: a flipped byte, a truncated file, or a file
renamed onto another's place fails authentication and is refused by name, never half-read.

The key (32 bytes) comes from the environment of the process that reads or writes, never from a
recipe: ``LLM_RAY_ENCRYPTION_KEY`` (base64 or 64 hex digits) or ``LLM_RAY_ENCRYPTION_KEY_FILE``
(a file holding either, e.g. a mounted Kubernetes secret). Nothing here logs, stores or prints
the key; what files record is only that they are encrypted (``MAGIC``) and the key's
fingerprint (sha256 of a fixed label under the key: tells "wrong key" from "tampered" without
revealing anything usable).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import shutil

MAGIC = b"LLMRAY-AESGCM-1\n"
NONCE = 12
KEY_ENV, KEY_FILE_ENV = "LLM_RAY_ENCRYPTION_KEY", "LLM_RAY_ENCRYPTION_KEY_FILE"


from llm_ray.storage import StorageError


class EncryptionError(StorageError):
    """No key where one is needed, or a file that fails authentication."""


def _parse_key(text: str, where: str) -> bytes:
    text = text.strip()
    for decode in (bytes.fromhex, base64.b64decode):
        try:
            key = decode(text)
        except (ValueError, binascii.Error):
            continue
        if len(key) == 32:
            return key
    raise EncryptionError(f"{where}: not a 32-byte key (give 64 hex digits or base64 of 32 bytes)")


def load_key(required: bool = True) -> bytes | None:
    """The key from ``LLM_RAY_ENCRYPTION_KEY`` or the file ``LLM_RAY_ENCRYPTION_KEY_FILE`` names."""
    if os.environ.get(KEY_ENV):
        return _parse_key(os.environ[KEY_ENV], KEY_ENV)
    if os.environ.get(KEY_FILE_ENV):
        path = os.environ[KEY_FILE_ENV]
        try:
            with open(path) as f:
                return _parse_key(f.read(), f"{KEY_FILE_ENV} ({path})")
        except OSError as e:
            raise EncryptionError(f"{KEY_FILE_ENV}: cannot read {path}: {e.strerror}") from None
    if required:
        raise EncryptionError(f"encryption needs a key: set {KEY_ENV} (64 hex digits or base64 of 32 bytes) or {KEY_FILE_ENV}")
    return None


def key_file_env() -> dict:
    """Environment for Ray workers that must read or write sealed files: the key file's absolute
    path when ``LLM_RAY_ENCRYPTION_KEY_FILE`` is set. Never the key itself: a runtime env is shown
    by the dashboard; ``LLM_RAY_ENCRYPTION_KEY`` must be set on the nodes (e.g. from a Secret)."""
    path = os.environ.get(KEY_FILE_ENV)
    return {KEY_FILE_ENV: os.path.abspath(path)} if path else {}


def key_fingerprint(key: bytes) -> str:
    return hmac.new(key, b"llm-ray key fingerprint", hashlib.sha256).hexdigest()[:16]


def check_fingerprint(key: bytes, fingerprint: str | None, what: str) -> bytes:
    """``key`` once it is the one ``what`` was sealed with (its manifest's ``fingerprint``);
    EncryptionError, one line, when it is another: a wrong key is told apart from tampering."""
    if key_fingerprint(key) != fingerprint:
        raise EncryptionError(f"{what} is encrypted with another key (fingerprint {fingerprint}, "
                              f"this process's key {key_fingerprint(key)})")
    return key


def is_encrypted(data: bytes) -> bool:
    return data.startswith(MAGIC)


def encrypt_bytes(data: bytes, name: str, key: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(NONCE)  # 96-bit random nonces: safe for far more files than a run writes
    return MAGIC + nonce + AESGCM(key).encrypt(nonce, data, name.encode())


def decrypt_bytes(blob: bytes, name: str, key: bytes) -> bytes:
    """The plaintext of an encrypted file; EncryptionError naming it when it fails authentication."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not is_encrypted(blob):
        raise EncryptionError(f"{name}: not an encrypted file")
    body = blob[len(MAGIC):]
    try:
        return AESGCM(key).decrypt(body[:NONCE], body[NONCE:], name.encode())
    except InvalidTag:
        raise EncryptionError(f"{name}: refused, it fails authentication (modified, truncated, moved, or another key)") from None


def encrypt_tree(folder: str, key: bytes, skip: tuple[str, ...] = ()) -> list[str]:
    """Encrypt every file under ``folder`` in place (names relative to it are the associated
    data), except the names in ``skip``; returns the relative names encrypted."""
    done = []
    for root, _, files in os.walk(folder):
        for f in sorted(files):
            path = os.path.join(root, f)
            rel = os.path.relpath(path, folder)
            if rel in skip:
                continue
            encrypt_file(path, rel, key)
            done.append(rel)
    return done


def encrypt_file(path: str, name: str, key: bytes) -> None:
    """Replace the file at ``path`` by its encryption (``name``: its associated data)."""
    with open(path, "rb") as fh:
        data = fh.read()
    tmp = path + ".enc-tmp"
    with open(tmp, "wb") as fh:
        fh.write(encrypt_bytes(data, name, key))
    os.replace(tmp, path)


def decrypted_copy(src: str, dst: str, key: bytes | None) -> int:
    """Copy the tree ``src`` to ``dst``, decrypting encrypted files (authenticated); returns how
    many were encrypted. ``key`` None: EncryptionError at the first encrypted file."""
    count = 0
    for root, _, files in os.walk(src):
        for f in files:
            path = os.path.join(root, f)
            rel = os.path.relpath(path, src)
            out = os.path.join(dst, rel)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with open(path, "rb") as fh:
                head = fh.read(len(MAGIC))
            if head != MAGIC:
                shutil.copyfile(path, out)
                continue
            if key is None:
                key = load_key()
            with open(path, "rb") as fh:
                data = decrypt_bytes(fh.read(), rel, key)
            with open(out, "wb") as fh:
                fh.write(data)
            count += 1
    return count


def read_maybe_encrypted(path: str, name: str) -> bytes:
    """A file's bytes, decrypted (with the environment's key) when it is encrypted."""
    with open(path, "rb") as f:
        data = f.read()
    return decrypt_bytes(data, name, load_key()) if is_encrypted(data) else data


def encryption_failure(error: BaseException) -> EncryptionError | None:
    """The EncryptionError behind a failure raised in another process (a Ray Train worker's
    restore), recovered from its traceback text; None when it is not one."""
    import traceback

    text = "".join(traceback.format_exception(error))
    found = re.findall(r"EncryptionError: (.+)", text)
    return EncryptionError(found[-1].strip()) if found else None
