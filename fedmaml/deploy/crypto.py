"""TLS certificates and SuperNode authentication keys, made with ``cryptography`` (which Flower
needs anyway).

* :func:`make_certificates`: a private certificate authority (``ca.crt``, ``ca.key``) and a SuperLink
  server certificate signed by it (``server.pem``, ``server.key``) whose subject alternative names
  list every host name or IP address the SuperNodes and the ``flwr`` CLI use to reach the SuperLink.
  Devices only need ``ca.crt``.
* :func:`make_node_keys`: one ECDSA P-384 key pair per SuperNode in OpenSSH format (``<name>``
  private, ``<name>.pub`` public), the format ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register`` read.

Private keys are written with mode 0600. Existing files are never overwritten: regenerating a CA
would silently lock out every device that trusts the old one.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmaml.errors import FedmamlError

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"
#: Names the SuperLink is always reachable under on its own machine (its SuperExec connects there).
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


class DeployError(FedmamlError):
    """A deployment step cannot proceed (existing files, bad host names, missing programs...)."""


@dataclass(frozen=True)
class Certificates:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / CA_CERT

    @property
    def cert(self) -> Path:
        return self.directory / SERVER_CERT

    @property
    def key(self) -> Path:
        return self.directory / SERVER_KEY

    def check(self) -> "Certificates":
        missing = [p.name for p in (self.ca, self.cert, self.key) if not p.is_file()]
        if missing:
            raise DeployError(f"certificate directory {self.directory} lacks {', '.join(missing)}; "
                              "create it with `fedmaml deploy certs DIR --host <superlink address>`")
        return self


def _write_new(path: Path, data: bytes, private: bool = False) -> None:
    """Write a file that must not exist yet (0600 for private keys, from the first byte on)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(path, flags, 0o600 if private else 0o644)
    except FileExistsError:
        raise DeployError(f"{path} exists already; it is never overwritten (move it away to "
                          "regenerate, and redistribute the new files)") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(c.isspace() or c in "/:@" for c in host):
        raise DeployError(f"--host {host!r} is neither an IP address nor a host name "
                          "(give it without port or scheme, e.g. 192.168.1.10 or server.local)")
    return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_certificates(directory: str | Path, hosts: Sequence[str] = (), days: int = 825
                      ) -> Certificates:
    """A CA and a SuperLink certificate valid for ``hosts`` plus :data:`LOCAL_HOSTS`."""
    directory = Path(directory)
    names = list(dict.fromkeys([*hosts, *LOCAL_HOSTS]))  # keep order, drop duplicates
    sans = [_san(h) for h in names]
    directory.mkdir(parents=True, exist_ok=True)
    for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY):
        if (directory / name).exists():
            raise DeployError(f"{directory / name} exists already; certificates are never "
                              "overwritten (use a new directory, then redistribute ca.crt)")
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmaml federation CA")])
    ca_cert = (x509.CertificateBuilder()
               .subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                              critical=False)
               .sign(ca_key, hashes.SHA384()))

    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))

    pem = serialization.Encoding.PEM
    _write_new(directory / CA_KEY, _pem_key(ca_key), private=True)
    _write_new(directory / CA_CERT, ca_cert.public_bytes(pem))
    _write_new(directory / SERVER_KEY, _pem_key(key), private=True)
    _write_new(directory / SERVER_CERT, cert.public_bytes(pem))
    return Certificates(directory)


def certificate_hosts(path: str | Path) -> list[str]:
    """The host names and IP addresses a server certificate is valid for."""
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + \
        [str(v) for v in san.get_values_for_type(x509.IPAddress)]


def make_node_keys(directory: str | Path, names: Sequence[str]) -> list[Path]:
    """One OpenSSH ECDSA P-384 key pair per name; returns the public key files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not name or "/" in name or name.startswith(".") or name.endswith(".pub"):
            raise DeployError(f"node key name {name!r}: use a plain file name such as node-0")
        for path in (directory / name, directory / f"{name}.pub"):
            if path.exists():
                raise DeployError(f"{path} exists already; node keys are never overwritten "
                                  "(a new key must be registered again)")
    publics = []
    for name in names:
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
        _write_new(directory / name, private, private=True)
        _write_new(directory / f"{name}.pub", public + f" {name}\n".encode())
        publics.append(directory / f"{name}.pub")
    return publics
