"""Image fetching against a real local HTTP server playing Label Studio's file serving:
URL resolution, auth (legacy token, personal access token), host allow-list (redirects
included), size caps, decoding, the disk cache."""

import base64
import io
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from s4al_backend.images import (
    ImageCache,
    ImageDecodeError,
    ImageDownloadError,
    ImageFetcher,
    ImageRefused,
    ImageTooLarge,
    decode_image,
)
from tests.service_helpers import (
    LEGACY_KEY,
    FileServer,
    make_settings,
    personal_access_token,
    png_bytes,
)


@pytest.fixture
def server():
    with FileServer() as srv:
        yield srv


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)


def test_relative_url_with_legacy_token(tmp_path, server, image):
    path = server.add("/data/upload/1/a.png", png_bytes(image))
    fetcher = ImageFetcher(make_settings(tmp_path, server))
    np.testing.assert_array_equal(fetcher.load(path), image)
    assert server.requests[-1] == ("GET", path, f"Token {LEGACY_KEY}")


def test_local_files_url_keeps_its_query(tmp_path, server, image):
    path = server.add("/data/local-files/?d=camvid/a.png", png_bytes(image))
    fetcher = ImageFetcher(make_settings(tmp_path, server))
    np.testing.assert_array_equal(fetcher.load(path), image)


def test_personal_access_token_is_exchanged_for_bearer(tmp_path, image):
    token = personal_access_token()
    with FileServer(token=token) as server:
        path = server.add("/data/upload/1/a.png", png_bytes(image))
        fetcher = ImageFetcher(make_settings(tmp_path, server, label_studio_api_key=token))
        np.testing.assert_array_equal(fetcher.load(path), image)
        methods = [(m, p.rstrip("/")) for m, p, _ in server.requests]
        assert ("POST", "/api/token/refresh") in methods
        auth = server.requests[-1][2]
        assert auth.startswith("Bearer ") and auth[7:] in server.access_tokens
        assert token not in auth


def test_refused_refresh_is_a_clear_error(tmp_path):
    with FileServer(token="something-else") as server:
        server.add("/data/upload/a.png", b"x")
        settings = make_settings(tmp_path, server, label_studio_api_key=personal_access_token())
        with pytest.raises(ImageDownloadError, match="personal access token"):
            ImageFetcher(settings).fetch_bytes("/data/upload/a.png")


def test_wrong_key_gives_401_with_a_hint(tmp_path, server, image):
    path = server.add("/data/upload/1/a.png", png_bytes(image))
    fetcher = ImageFetcher(make_settings(tmp_path, server, label_studio_api_key="f" * 40))
    with pytest.raises(ImageDownloadError, match="HTTP 401.*LABEL_STUDIO_API_KEY") as info:
        fetcher.fetch_bytes(path)
    assert info.value.http_status == 401
    assert "f" * 40 not in str(info.value)


def test_foreign_host_refused_and_never_contacted(tmp_path, server, image):
    with FileServer() as other:
        url = other.url + other.add("/public/a.png", png_bytes(image))
        fetcher = ImageFetcher(make_settings(tmp_path, server))
        with pytest.raises(ImageRefused, match="ALLOWED_IMAGE_HOSTS"):
            fetcher.fetch_bytes(url)
        assert other.requests == []
        # listed: fetched, and without Label Studio's credentials
        allowed = ImageFetcher(make_settings(tmp_path, server, allowed_image_hosts=(other.host,)))
        np.testing.assert_array_equal(allowed.load(url), image)
        assert other.requests[-1][2] is None


def test_redirect_to_foreign_host_refused(tmp_path, server, image):
    with FileServer() as other:
        target = other.url + other.add("/public/a.png", png_bytes(image))
        fetcher = ImageFetcher(make_settings(tmp_path, server))
        with pytest.raises(ImageRefused, match="redirects"):
            fetcher.fetch_bytes(f"/redirect?to={target}")
        assert other.requests == []
        # an allowed redirect target is followed, credentials dropped on the way
        allowed = ImageFetcher(make_settings(tmp_path, server, allowed_image_hosts=(other.host,)))
        np.testing.assert_array_equal(allowed.load(f"/redirect?to={target}"), image)
        assert other.requests[-1][2] is None


def test_unsupported_urls(tmp_path, server):
    fetcher = ImageFetcher(make_settings(tmp_path, server))
    for url in ("ftp://x/a.png", "file:///etc/passwd", "data:image/png;base64,AAAA", "a.png",
                "//evil.com/a.png", ""):
        with pytest.raises(ImageRefused):
            fetcher.fetch_bytes(url)


def test_cloud_uri_goes_through_presign(tmp_path, server, image):
    uri = "s3://bucket/dir/a.png"
    encoded = base64.urlsafe_b64encode(uri.encode()).decode()
    server.add(f"/tasks/7/presign/?fileuri={encoded}", png_bytes(image))
    fetcher = ImageFetcher(make_settings(tmp_path, server))
    np.testing.assert_array_equal(fetcher.load(uri, task_id=7), image)
    with pytest.raises(ImageRefused, match="task id"):
        fetcher.fetch_bytes(uri)


def test_http_errors(tmp_path, server):
    fetcher = ImageFetcher(make_settings(tmp_path, server))
    with pytest.raises(ImageDownloadError, match="HTTP 404"):
        fetcher.fetch_bytes("/data/upload/missing.png")
    with pytest.raises(ImageDownloadError, match="HTTP 500"):
        fetcher.fetch_bytes("/status/500")
    dead = ImageFetcher(make_settings(tmp_path, None))  # nothing listens on port 9
    with pytest.raises(ImageDownloadError, match="cannot reach"):
        dead.fetch_bytes("/data/upload/a.png")


def test_size_caps(tmp_path, server, image):
    data = png_bytes(image)
    path = server.add("/data/upload/big.png", data)
    fetcher = ImageFetcher(make_settings(tmp_path, server, max_image_bytes=len(data) - 1))
    with pytest.raises(ImageTooLarge, match="MAX_IMAGE_BYTES"):
        fetcher.fetch_bytes(path)
    fetcher = ImageFetcher(make_settings(tmp_path, server, max_image_pixels=30 * 40 - 1))
    with pytest.raises(ImageTooLarge, match="30 = 1200 pixels"):
        fetcher.load(path)


def test_pixel_cap_checked_before_decoding(image):
    # a PNG whose header claims 20000 x 20000 px and whose data is a 40 x 30 image: the
    # header alone refuses it (decoding would fail differently)
    def claiming(side: int) -> bytes:
        data = bytearray(png_bytes(image))
        ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
        ihdr[4:12] = side.to_bytes(4, "big") * 2
        data[12:29] = ihdr
        data[29:33] = zlib.crc32(bytes(ihdr)).to_bytes(4, "big")
        return bytes(data)

    with pytest.raises(ImageTooLarge, match="5000x5000 = 25000000 pixels, over MAX_IMAGE_PIXELS"):
        decode_image(claiming(5000), 1_000_000)
    # past Pillow's own decompression-bomb guard: refused the same way
    with pytest.raises(ImageTooLarge, match="MAX_IMAGE_PIXELS"):
        decode_image(claiming(20000), 10**12)


def test_decode_formats_and_broken_bytes(image):
    np.testing.assert_array_equal(decode_image(png_bytes(image), 10**6), image)
    gray = Image.fromarray(image[:, :, 0])
    buffer = io.BytesIO()
    gray.save(buffer, format="PNG")
    out = decode_image(buffer.getvalue(), 10**6)
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    rgba = Image.fromarray(np.dstack([image, np.full((30, 40), 128, np.uint8)]))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    np.testing.assert_array_equal(decode_image(buffer.getvalue(), 10**6), image)
    with pytest.raises(ImageDecodeError):
        decode_image(b"not an image at all", 10**6)
    with pytest.raises(ImageDecodeError):
        decode_image(png_bytes(image)[:60], 10**6)  # truncated


def test_exif_orientation_applied():
    image = np.zeros((10, 20, 3), np.uint8)
    image[:, :5] = 255
    pil = Image.fromarray(image)
    exif = pil.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", exif=exif, quality=95)
    out = decode_image(buffer.getvalue(), 10**6)
    assert out.shape == (20, 10, 3)


def test_cache_hits_skip_the_server(tmp_path, server, image):
    path = server.add("/data/upload/1/a.png", png_bytes(image))
    fetcher = ImageFetcher(make_settings(tmp_path, server))
    fetcher.load(path)
    fetcher.load(path)
    assert server.count(path) == 1
    # a fresh process (new fetcher) reads the same disk cache
    ImageFetcher(make_settings(tmp_path, server)).load(path)
    assert server.count(path) == 1
    # cache off: every load downloads
    off = ImageFetcher(make_settings(tmp_path, server, image_cache_mb=0))
    off.load(path)
    assert server.count(path) == 2


def test_cache_size_cap_evicts_least_recently_used(tmp_path):
    cache = ImageCache(tmp_path / "cache", max_bytes=1000)
    for i in range(5):
        cache.put(f"http://ls/{i}", bytes(300))
    kept = [i for i in range(5) if cache.get(f"http://ls/{i}") is not None]
    assert sum(300 for _ in kept) <= 1000
    assert 4 in kept and 0 not in kept
    cache.put("http://ls/huge", bytes(5000))  # larger than the whole cache: not stored
    assert cache.get("http://ls/huge") is None


# ------------------------------------------------------------- the API key stays home (issue 14)
def backslash_url(foreign: FileServer, ls: FileServer, path: str) -> str:
    """urlsplit reads Label Studio's host here; requests connects to ``foreign``."""
    return f"http://{foreign.host}\\@{ls.host}{path}"


def test_backslash_userinfo_trick_never_sends_the_key_abroad(tmp_path, server, image):
    path = server.add("/data/upload/1/a.png", png_bytes(image))
    fetcher = ImageFetcher(make_settings(tmp_path, server))
    with FileServer() as foreign:
        with pytest.raises(ImageRefused, match="ambiguously"):
            fetcher.fetch_bytes(backslash_url(foreign, server, path))
        assert foreign.requests == []
    assert server.requests == []


def test_redirect_hop_decided_like_the_client(tmp_path, server, image):
    path = server.add("/data/upload/1/a.png", png_bytes(image))
    fetcher = ImageFetcher(make_settings(tmp_path, server))
    with FileServer() as foreign:
        target = backslash_url(foreign, server, path)
        with pytest.raises(ImageRefused, match="redirects elsewhere"):
            fetcher.fetch_bytes(f"/redirect?to={target}")
        assert foreign.requests == []


def test_a_label_studio_url_without_port_allows_only_the_default_port(tmp_path, image):
    with FileServer() as other:
        url = other.url + other.add("/public/a.png", png_bytes(image))
        # LABEL_STUDIO_URL names the host alone: port 80, not any port of that host
        fetcher = ImageFetcher(make_settings(tmp_path, label_studio_url="http://127.0.0.1"))
        with pytest.raises(ImageRefused, match="ALLOWED_IMAGE_HOSTS"):
            fetcher.fetch_bytes(url)
        allowed = ImageFetcher(make_settings(tmp_path, label_studio_url="http://127.0.0.1",
                                             allowed_image_hosts=("127.0.0.1",)))
        with pytest.raises(ImageRefused):  # a listed host without a port: its default port
            allowed.fetch_bytes(url)
        assert other.requests == []


def test_credentials_in_a_task_url_are_refused(tmp_path, server, image):
    path = server.add("/data/upload/1/a.png", png_bytes(image))
    fetcher = ImageFetcher(make_settings(tmp_path, server))
    with pytest.raises(ImageRefused, match="user:password"):
        fetcher.fetch_bytes(f"http://someone:secret@{server.host}{path}")
    assert server.requests == []


def test_presign_task_id_is_escaped(tmp_path, server, image):
    uri = "s3://bucket/a.png"
    encoded = base64.urlsafe_b64encode(uri.encode()).decode()
    fetcher = ImageFetcher(make_settings(tmp_path, server))
    with pytest.raises(ImageDownloadError, match="HTTP 404"):
        fetcher.fetch_bytes(uri, task_id="7/../../data/upload/1/a.png?")
    assert server.requests[-1][1] == (
        f"/tasks/7%2F..%2F..%2Fdata%2Fupload%2F1%2Fa.png%3F/presign/?fileuri={encoded}")


def test_a_trickled_image_fails_at_the_overall_deadline(tmp_path, server):
    # 1 byte / 0.2 s never trips a per-read timeout; 50 bytes would take 10 s
    fetcher = ImageFetcher(make_settings(tmp_path, server, image_timeout=1))
    started = time.monotonic()
    with pytest.raises(ImageDownloadError, match=r"longer than IMAGE_TIMEOUT \(1 s\)") as info:
        fetcher.fetch_bytes("/slow/50?every=0.2")
    assert time.monotonic() - started < 2.0
    assert info.value.http_status == 504
