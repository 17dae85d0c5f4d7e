"""Certificates and SuperNode keys for a Flower 1.42 fleet, made with ``cryptography`` only.

No ``openssl`` or ``ssh-keygen``: a phone or a CI image may lack them, and these are the formats
Flower itself parses, so a file written here is a file Flower accepts.

- TLS (``flower-superlink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``, ``flower-supernode
  --root-certificates``, the ``root-certificates`` of a ``flwr`` connection): a self-signed CA and a
  server certificate signed by it, PEM. The server certificate names every host the SuperNodes
  and the ``flwr`` CLI dial (``127.0.0.1`` and ``localhost`` by default) as subjectAltNames:
  clients check the name they connected to against the SAN, not the CN.
- SuperNode authentication: an EC key pair on a NIST curve (P-384, what Flower's docs use).
  Flower 1.42 reads the private key with ``load_ssh_private_key`` (``flower-supernode
  --auth-supernode-private-key``) and the public key with ``load_ssh_public_key`` (``flwr supernode
  register``), and refuses Ed25519/RSA: so OpenSSH format, ``ecdsa-sha2-nistp384``.

Private keys are written with mode 0600 before any byte goes in.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
NODE_CURVE = ec.SECP384R1


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKey:
    private: Path      # OpenSSH private key: flower-supernode --auth-supernode-private-key
    public: Path       # OpenSSH public key: flwr supernode register


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedquant"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(hosts) -> x509.SubjectAlternativeName:
    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if not h or any(c in h for c in " /:"):
                raise ValueError(f"{h!r} is neither an IP address nor a DNS name") from None
            names.append(x509.DNSName(h))
    if not names:
        raise ValueError("the server certificate needs at least one host name or address")
    return x509.SubjectAlternativeName(names)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(days: int = 365):
    """A self-signed CA (key, certificate) allowed to sign server certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("fedquant fleet CA")).issuer_name(_name("fedquant fleet CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_server_cert(ca_key, ca_cert, hosts=DEFAULT_HOSTS, days: int = 365):
    """A server (key, certificate) for ``hosts`` (IPs and DNS names, all in the SAN), signed by the CA."""
    hosts = list(hosts)
    san = _san(hosts)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(san, critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def write_tls(out_dir, hosts=DEFAULT_HOSTS, days: int = 365) -> TlsFiles:
    """``ca.pem``, ``server.pem`` and ``server.key`` in ``out_dir`` (the CA key is not kept: a
    new server certificate means a new CA, which the nodes then need again)."""
    out = Path(out_dir)
    ca_key, ca_cert = make_ca(days)
    key, cert = make_server_cert(ca_key, ca_cert, hosts, days)
    pem = serialization.Encoding.PEM
    return TlsFiles(_write(out / "ca.pem", ca_cert.public_bytes(pem)),
                    _write(out / "server.pem", cert.public_bytes(pem)),
                    _write(out / "server.key", _pem_key(key), private=True))


def make_node_key():
    """A SuperNode's EC P-384 private key."""
    return ec.generate_private_key(NODE_CURVE())


def node_key_bytes(key, comment: str = "") -> tuple[bytes, bytes]:
    """(OpenSSH private key, OpenSSH public key line) of an EC node key."""
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return priv, pub + (f" {comment}".encode() if comment else b"") + b"\n"


def write_node_key(out_dir, name: str) -> NodeKey:
    """``<name>`` (private, 0600) and ``<name>.pub`` in ``out_dir``, as Flower reads them."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"{name!r} cannot be a key file name")
    priv, pub = node_key_bytes(make_node_key(), comment=name)
    out = Path(out_dir)
    return NodeKey(_write(out / name, priv, private=True), _write(out / f"{name}.pub", pub))


def load_node_public_key(path) -> ec.EllipticCurvePublicKey:
    """The public key of a ``.pub`` file, checked the way ``flwr supernode register`` checks it."""
    key = serialization.load_ssh_public_key(Path(path).read_bytes())
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{path}: not an EC public key ({type(key).__name__}); Flower 1.42 needs a NIST EC key")
    return key


def load_node_private_key(path) -> ec.EllipticCurvePrivateKey:
    """The private key of a node key file, checked the way ``flower-supernode`` checks it."""
    key = serialization.load_ssh_private_key(Path(path).read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an EC private key ({type(key).__name__}); Flower 1.42 needs a NIST EC key")
    return key


def public_key_fingerprint(path) -> str:
    """SHA-256 of the public key's DER (to tell keys apart in logs and state files)."""
    der = load_node_public_key(path).public_bytes(serialization.Encoding.DER,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    h = hashes.Hash(hashes.SHA256())
    h.update(der)
    return h.finalize().hex()[:16]
