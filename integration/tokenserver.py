"""A token server for docker-registry's ``auth: token:`` — the distribution token authentication spec, as
Docker Hub's auth service, Harbor's or GitLab's answer it — for tests: no token server package exists here.

``GET <realm>?service=S&scope=repository:NAME:pull,push…`` with HTTP basic credentials (or none: anonymous)
answers ``{"token", "access_token", "expires_in", "issued_at"}``.  The token is a JWT signed with ES256 by
``cryptography`` through PyJWT (no hand-written signing); its header carries ``x5c``, the signing certificate,
which the registry checks against its ``rootcertbundle``; its claims are ``iss``, ``sub``, ``aud`` (the
service), ``exp``/``nbf``/``iat``, ``jti`` and ``access`` — the requested actions each user is granted
(``users``: name → password and repository-pattern grants), nothing more: a read-only user asking for
``pull,push`` gets a token for ``pull`` only, as real token servers answer, and the registry then refuses the
push.  Wrong credentials get 401.

docker-registry accepts a token until 60 s past its ``exp`` (clock-skew leeway, distribution's
``token.Leeway``), so the ``exp`` written is ``ttl - leeway`` seconds ahead: a token the server says lives
``ttl`` seconds (``expires_in``) is refused by the registry from then on, which lets a test see a token expire
without waiting a minute more.

Every request is recorded (path, the basic user if any, whether an ``Authorization`` header came, the
scopes), so a test can tell which credentials reached which host.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import fnmatch
import json
import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REGISTRY_LEEWAY = 60  # seconds docker-registry accepts a token past its exp (distribution's token.Leeway)


@dataclass(frozen=True)
class User:
    password: str
    grants: dict[str, tuple[str, ...]] = field(default_factory=dict)  # repository glob → actions ("pull", "push")


@dataclass(frozen=True)
class Hit:
    path: str
    user: str | None  # the basic-auth user name sent, if any
    authorization: bool  # an Authorization header came at all
    scopes: tuple[str, ...]
    status: int
    token: str = ""  # the token issued, if any


def _signing_material(dest: Path, issuer: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, Path]:
    """An ES256 key and a self-signed certificate for it; the certificate is the registry's rootcertbundle."""
    dest.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    bundle = dest / "token-signing.crt"
    bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, bundle


class TokenServer:
    """``with TokenServer(dir, users) as ts:`` — serving on ``ts.realm``; ``ts.registry_auth()`` is the registry's
    ``auth:`` section."""

    def __init__(self, root: Path, users: dict[str, User], *, host: str = "127.0.0.1", ttl: int = 300,
                 service: str = "bootseer-test-registry", issuer: str = "bootseer-test-token-issuer",
                 anonymous: tuple[str, ...] = (), tls: tuple[Path, Path] | None = None) -> None:
        """``anonymous``: repository globs anyone may pull without credentials (none by default).  ``tls``:
        (certificate, key) to serve HTTPS with, as an auth service on another host does."""
        self.users, self.ttl, self.service, self.issuer = users, ttl, service, issuer
        self.anonymous = anonymous
        self._key, cert, self.bundle = _signing_material(Path(root), issuer)
        self._x5c = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
        self.hits: list[Hit] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server._handle(self)

            def do_POST(self) -> None:  # the OAuth2 grant is not served: clients fall back to GET
                server._reply(self, 404, {"error": "unsupported"}, None, ())

            def log_message(self, format: str, *args: Any) -> None:  # quiet test output
                pass

        self._httpd = ThreadingHTTPServer((host, 0), Handler)
        self._httpd.daemon_threads = True
        self.scheme = "https" if tls else "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True)
        self.address = f"{host}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def realm(self) -> str:
        return f"{self.scheme}://{self.address}/token"

    def registry_auth(self) -> dict[str, Any]:
        """docker-registry's ``auth`` configuration section for this server."""
        return {"token": {"realm": self.realm, "service": self.service, "issuer": self.issuer,
                          "rootcertbundle": str(self.bundle)}}

    def start(self) -> TokenServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------- tokens
    def token(self, subject: str, access: list[dict[str, Any]], ttl: int | None = None) -> str:
        """A token the registry accepts for ``access`` (``[{"type", "name", "actions"}]``) for ``ttl`` seconds."""
        now = int(time.time())
        ttl = self.ttl if ttl is None else ttl
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "iat": now, "nbf": now - 1,
                  "exp": now + ttl - REGISTRY_LEEWAY, "jti": secrets.token_hex(12), "access": access}
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"x5c": self._x5c})

    def granted(self, user: str | None, scope: str) -> dict[str, Any] | None:
        """The access entry a scope ``repository:NAME:ACTIONS`` earns ``user`` (None: anonymous)."""
        parts = scope.split(":")
        if len(parts) < 3 or parts[0] != "repository":
            return None
        name, wanted = ":".join(parts[1:-1]), parts[-1].split(",")
        grants = self.users[user].grants if user else {pat: ("pull",) for pat in self.anonymous}
        allowed = {a for pat, acts in grants.items() if fnmatch.fnmatchcase(name, pat) for a in acts}
        return {"type": "repository", "name": name, "actions": [a for a in wanted if a in allowed]}

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        url = urlparse(req.path)
        q = parse_qs(url.query)
        scopes = tuple(s for v in q.get("scope", []) for s in v.split(" ") if s)
        header = req.headers.get("Authorization")
        user: str | None = None
        if header and header.lower().startswith("basic "):
            try:
                user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return self._reply(req, 400, {"error": "bad basic credentials"}, None, scopes)
            entry = self.users.get(user)
            if entry is None or not secrets.compare_digest(entry.password, password):
                return self._reply(req, 401, {"error": "invalid credentials"}, user, scopes)
        if url.path != "/token" or q.get("service", [""])[0] != self.service:
            return self._reply(req, 404, {"error": "unknown service or path"}, user, scopes)
        access = [a for a in (self.granted(user, s) for s in scopes) if a is not None]
        tok = self.token(user or "", access)
        doc = {"token": tok, "access_token": tok, "expires_in": self.ttl,
               "issued_at": datetime.datetime.now(datetime.UTC).isoformat()}
        self._reply(req, 200, doc, user, scopes, tok)

    def _reply(self, req: BaseHTTPRequestHandler, status: int, doc: dict[str, Any], user: str | None,
               scopes: tuple[str, ...], token: str = "") -> None:
        with self._lock:
            self.hits.append(Hit(urlparse(req.path).path, user, "Authorization" in req.headers, scopes, status,
                                 token))
        body = json.dumps(doc).encode()
        req.send_response(status)
        if status == 401:
            req.send_header("WWW-Authenticate", 'Basic realm="bootseer-test-token"')
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)
