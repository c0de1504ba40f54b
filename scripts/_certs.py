"""A throwaway self-signed certificate for the TLS runs of the scripts.

``openssl`` makes it (an EC P-256 key, as most sites use today; SANs
``localhost`` and ``127.0.0.1``), into a directory the caller owns. The
certificate is its own CA: clients trust ``cert`` to verify it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import attrs


@attrs.frozen
class Certs:
    """PEM files: ``cert`` (also the CA to trust), ``key``, and ``combined``
    (certificate then key, the form HAProxy's ``crt`` takes)."""

    cert: Path
    key: Path
    combined: Path


def self_signed(directory: Path) -> Certs:
    """Write a self-signed certificate and key for localhost into ``directory``.

    Raises:
        RuntimeError: openssl is missing or failed.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the TLS runs need openssl (apt-get install openssl)")
    certs = Certs(directory / "cert.pem", directory / "key.pem", directory / "combined.pem")
    command = [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    command += ["-nodes", "-days", "2", "-subj", "/CN=localhost"]
    command += ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    command += ["-keyout", str(certs.key), "-out", str(certs.cert)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl failed: {done.stderr.strip()[-300:]}")
    certs.combined.write_bytes(certs.cert.read_bytes() + certs.key.read_bytes())
    return certs
