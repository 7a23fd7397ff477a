"""Misuse and hostile answers: where the key and the bytes may go, what an error may show, and
what a preview may render. Real TLS and HTTP servers on 127.0.0.1."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from posthog_assets.api.client import PostHogClient, RetrySettings
from posthog_assets.api.errors import PostHogDownloadError, PostHogError, PostHogServerError
from posthog_assets.config import validate_host
from posthog_assets.exports.previews import file_preview_metadata

ONE_TRY = RetrySettings(max_attempts=1)
SIGNATURE = "X-Amz-Signature=deadbeefcafe"


def _certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``name`` (and its key), valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        alt = x509.DNSName(name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class _Server(ThreadingHTTPServer):
    """Answers every GET with ``status``, ``headers`` and ``body``; records what it got."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                server.seen.append((self.path, dict(self.headers)))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    def serve(self, tls: tuple[Path, Path] | None = None) -> str:
        scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.socket = context.wrap_socket(self.socket, server_side=True)
            scheme = "https"
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return f"{scheme}://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def servers() -> Iterator[list[_Server]]:
    started: list[_Server] = []
    yield started
    for server in started:
        server.shutdown()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("host", "fragment"),
    [
        ("http://evil.example\\@127.0.0.1:8000", "no user name, password or backslash"),
        ("https://user:secret@us.posthog.com", "no user name, password or backslash"),
        ("http://127.0.0.1:99999", "no user name, password or backslash"),
    ],
)
def test_a_host_requests_would_read_differently_is_refused(host: str, fragment: str) -> None:
    """``http://evil.example\\@127.0.0.1:8000`` passed as loopback (plain http allowed) while
    requests connects to evil.example; no password in a host reaches a message either."""
    with pytest.raises(ValueError) as err:
        validate_host(host)
    assert fragment in str(err.value) and "secret" not in str(err.value)


@pytest.mark.integration
def test_an_https_download_redirected_to_plain_http_is_refused_showing_only_the_host(
    servers: list[_Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = _Server(200, {"Content-Type": "text/csv"}, b"a,b\r\n1,2\r\n")
    servers.append(storage)
    plain = storage.serve()
    posthog = _Server(302, {"Location": f"{plain}/exports/data.csv?{SIGNATURE}"})
    servers.append(posthog)
    cert, key = _certificate(tmp_path, "127.0.0.1")
    host = posthog.serve(tls=(cert, key))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    client = PostHogClient(host, 1, "phx_redirect_key", retry=ONE_TRY, rate_limits=None)

    with pytest.raises(PostHogDownloadError) as err:
        client.download_export_content(7, tmp_path / "out" / "data.csv")

    assert str(err.value) == (
        "GET exports/7/content/: the download was redirected to "
        f"{plain}, from https down to plain http; refused"
    )
    assert err.value.retryable is False and SIGNATURE not in str(err.value)
    assert storage.seen == [] and not (tmp_path / "out" / "data.csv").exists()


@pytest.mark.integration
def test_a_redirect_to_another_scheme_is_refused_without_the_location(
    servers: list[_Server], tmp_path: Path
) -> None:
    posthog = _Server(302, {"Location": f"file:///etc/passwd?{SIGNATURE}"})
    servers.append(posthog)
    client = PostHogClient(posthog.serve(), 1, "phx_k", retry=ONE_TRY, rate_limits=None)
    with pytest.raises(PostHogDownloadError, match="not an http\\(s\\) URL; refused") as err:
        client.download_export_content(7, tmp_path / "x.csv")
    assert SIGNATURE not in str(err.value) and "passwd" not in str(err.value)


@pytest.mark.integration
def test_connection_errors_name_the_host_and_the_tls_cause(
    servers: list[_Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server answering TLS with another name's certificate: the message says so."""
    posthog = _Server(200, {"Content-Type": "application/json"}, b"{}")
    servers.append(posthog)
    cert, key = _certificate(tmp_path, "posthog.other.example")
    host = posthog.serve(tls=(cert, key))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    client = PostHogClient(host, 1, "phx_k", retry=ONE_TRY, rate_limits=None)
    with pytest.raises(PostHogError) as err:
        client.list_group_types()
    text = str(err.value)
    assert text.startswith(f"GET {host}/api/projects/1/groups_types/: connection failed (")
    assert "CERTIFICATE_VERIFY_FAILED" in text and "127.0.0.1" in text


@pytest.mark.integration
def test_an_html_page_where_posthog_should_answer_says_what_to_check(
    servers: list[_Server],
) -> None:
    login = _Server(200, {"Content-Type": "text/html"}, b"<html><body>Sign in</body></html>")
    servers.append(login)
    host = login.serve()
    client = PostHogClient(host, 1, "phx_k", retry=ONE_TRY, rate_limits=None)
    with pytest.raises(PostHogServerError) as err:
        client.list_group_types()
    assert str(err.value) == (
        f"{host} answered 200 with a body that is not JSON (text/html): is host the base URL of "
        "a PostHog instance (e.g. https://us.posthog.com), not a login page or a proxy?"
    )


@pytest.mark.unit
def test_previews_of_tables_render_cells_as_text_never_markdown(tmp_path: Path) -> None:
    """Breakdown and property values come from anyone with the project's public token: a cell
    must not become a remote image (a beacon with the viewer's address) or a link."""
    path = tmp_path / "export.csv"
    image = "![x](https://attacker.example/p.png)"
    link = "[Re-auth](https://phish.example)"
    path.write_text(f"series,$browser\r\n{image},{link}\r\n<img src=x onerror=alert(1)>,ok\r\n")
    preview = file_preview_metadata(path, "text/csv")["preview"]
    assert preview.__class__.__name__ == "TableMetadataValue"
    assert [c.name for c in preview.schema.columns] == ["series", "$browser"]
    assert preview.records[0].data == {"series": image, "$browser": link}  # text, as written
