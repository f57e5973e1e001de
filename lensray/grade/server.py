"""The grading page's server: the standard library's ``http.server`` in a thread, on loopback only.

There is no login, so the page must not be reachable from other machines: binding anything but a loopback
address (127.0.0.0/8, ::1, localhost) is refused unless ``allow_remote``. Requests whose ``Host`` header
names another host are refused too (a web page elsewhere cannot reach the server through DNS rebinding),
and a grade must be posted as JSON (which another site's form cannot send without a CORS preflight, which
is never answered). Routes: ``/`` the page, ``/api/state`` the sequence with its grades and where to resume,
``/api/grade`` (POST) one grade, ``/img/<id>/<band or rgb>.png`` the pictures.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from lensray.errors import GradeError
from lensray.grade.candidates import Selection, read_candidates, score_summary, select, shown
from lensray.grade.grades import GRADES, GradeBook, grade_record
from lensray.grade.images import COMPOSITE, candidate_pngs
from lensray.profiles import DEFAULT_PROFILE, PROFILES, SurveyProfile, recorded_profile
from lensray.sky.fits import CutoutError

log = logging.getLogger(__name__)
CACHED_CANDIDATES = 64  # PNG sets kept in memory (about 100 kB each for the challenge's four bands)
MAX_BODY = 64 * 1024


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere: not trusted as loopback


def check_host(host: str, allow_remote: bool) -> None:
    """GradeError naming ``host`` unless it is a loopback address or ``allow_remote`` says otherwise."""
    if not allow_remote and not is_loopback(host):
        raise GradeError(
            f"refusing to serve the grading page on {host}: it is not a loopback address and the page has no "
            "login; use --host 127.0.0.1 (and an SSH tunnel from elsewhere), or --allow-remote if you mean it"
        )


class GradingSession:
    """One grader's session: the sequence to grade, the grades file, the pictures (cached per candidate)."""

    def __init__(
        self,
        selection: Selection,
        book: GradeBook,
        grader: str,
        images_url: str | None,
        bands: tuple[str, ...],
        profile: SurveyProfile = PROFILES[DEFAULT_PROFILE],
    ) -> None:
        self.selection, self.book, self.grader = selection, book, grader
        self.images_url, self.bands, self.profile = images_url, bands, profile
        self.rows = selection.frame.to_dict(orient="records")
        self.by_id = {int(row["id"]): row for row in self.rows}
        self._pngs: OrderedDict[int, dict[str, bytes] | str] = OrderedDict()
        self._lock = threading.Lock()

    def progress(self) -> tuple[int, int]:
        graded = self.book.grades_of(self.grader)
        return sum(object_id in graded for object_id in self.by_id), len(self.rows)

    def state(self) -> dict[str, Any]:
        graded = self.book.grades_of(self.grader)
        items = []
        for position, row in enumerate(self.rows):
            record = graded.get(int(row["id"]))
            item = {key: value for key, value in shown(row).items() if key != "random_low"}  # the slice stays blind
            items.append(
                {"pos": position, **item, "grade": record and record["grade"], "note": record and record["note"]}
            )
        resume = next((item["pos"] for item in items if item["grade"] is None), len(items))
        done, total = self.progress()
        images = bool(self.images_url)
        return {
            "grader": self.grader,
            "order": self.selection.describe(),
            "grades": GRADES,
            "bands": list(self.bands) if images else [],
            "composite": images and len(self.bands) >= 3,
            "candidates": items,
            "resume": resume,
            "graded": done,
            "total": total,
            "grades_file": str(self.book.out),
        }

    def grade(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            object_id = int(body["id"])
        except (KeyError, TypeError, ValueError):
            raise GradeError(f"a grade needs an integer id, got {body.get('id')!r}") from None
        if object_id not in self.by_id:
            raise GradeError(f"ID {object_id} is not among the candidates being graded")
        record = grade_record(self.by_id[object_id], body.get("grade", ""), str(body.get("note") or ""), self.grader)
        self.book.add(record)
        done, total = self.progress()
        return {"id": object_id, "grade": record["grade"], "note": record["note"], "graded": done, "total": total}

    def png(self, object_id: int, name: str) -> bytes:
        """One picture of a candidate; a GradeError names what is missing, a CutoutError a bad cutout."""
        if object_id not in self.by_id or not self.images_url or name not in (*self.bands, COMPOSITE):
            raise GradeError(f"no picture {name!r} of ID {object_id}")
        with self._lock:
            cached = self._pngs.get(object_id)
        if cached is None:
            try:
                cached = candidate_pngs(self.images_url, object_id, self.bands, self.profile)
            except CutoutError as exc:
                cached = str(exc)  # remembered: a missing file stays missing while the page is open
            with self._lock:
                self._pngs[object_id] = cached
                while len(self._pngs) > CACHED_CANDIDATES:
                    self._pngs.popitem(last=False)
        if isinstance(cached, str):
            raise GradeError(cached)
        if name not in cached:
            raise GradeError(f"no picture {name!r} of ID {object_id} (a composite needs three bands)")
        return cached[name]


def grading_session(
    candidates_url: str,
    out: str,
    *,
    images_url: str | None = None,
    bands: tuple[str, ...] | None = None,
    order: str = "score",
    top: int | None = None,
    random_low: int = 0,
    seed: int = 0,
    grader: str | None = None,
) -> GradingSession:
    """A session on the candidates of ``lensray score``: the images, bands and survey profile default to those
    the candidates were scored from (their ``_summary.json``), the grader to the login name."""
    import getpass

    candidates = read_candidates(candidates_url)
    summary = score_summary(candidates_url)
    grader = (grader if grader is not None else getpass.getuser()).strip()
    if not grader:
        raise GradeError("--grader cannot be empty")
    profile = recorded_profile(summary.get("profile"))
    return GradingSession(
        select(candidates, order, top, random_low, seed),
        GradeBook(out),
        grader,
        images_url or summary.get("images"),
        tuple(bands or summary.get("bands") or profile.band_names),
        profile,
    )


def page_html() -> bytes:
    return resources.files("lensray.grade").joinpath("page.html").read_bytes()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("grade page: " + format, *args)

    def _send(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store" if kind.startswith("application/json") else "max-age=3600")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(value).encode(), "application/json; charset=utf-8")

    def _host_ok(self) -> bool:
        allowed = self.server.allowed_hosts
        if allowed is None or self.headers.get("Host", "").lower() in allowed:
            return True
        self._json(HTTPStatus.FORBIDDEN, {"error": f"Host {self.headers.get('Host')!r} is not this server's"})
        return False

    def do_GET(self) -> None:
        if not self._host_ok():
            return
        session, path = self.server.session, self.path.split("?", 1)[0]
        try:
            if path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, page_html(), "text/html; charset=utf-8")
            elif path == "/api/state":
                self._json(HTTPStatus.OK, session.state())
            elif path.startswith("/img/") and path.endswith(".png") and path.count("/") == 3:
                _, _, object_id, name = path.split("/")
                self._send(HTTPStatus.OK, session.png(int(object_id), name[: -len(".png")]), "image/png")
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page {path}"})
        except (GradeError, ValueError) as exc:
            self._json(HTTPStatus.NOT_FOUND, {"error": str(exc)})

    def do_POST(self) -> None:
        if not self._host_ok():
            return
        if self.path != "/api/grade" or not self.headers.get("Content-Type", "").startswith("application/json"):
            self._json(HTTPStatus.BAD_REQUEST, {"error": "POST /api/grade takes a JSON body"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"body of {length} bytes (1 to {MAX_BODY})"})
            return
        try:
            self._json(HTTPStatus.OK, self.server.session.grade(json.loads(self.rfile.read(length))))
        except (GradeError, ValueError) as exc:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    session: GradingSession
    allowed_hosts: set[str] | None

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        # A page that moves on drops its pending picture requests: a closed connection is no error.
        quiet = isinstance(sys.exc_info()[1], ConnectionError)
        log.log(logging.DEBUG if quiet else logging.WARNING, "grade page: a request failed", exc_info=True)


@dataclass
class GradingServer:
    """A running page: ``url`` to open, ``close()`` to stop (``serve_forever`` runs in a daemon thread)."""

    url: str
    httpd: _Server
    thread: threading.Thread

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def serve(session: GradingSession, host: str = "127.0.0.1", port: int = 0, allow_remote: bool = False) -> GradingServer:
    """Start the page on ``host:port`` (0: a free port) in a thread; refuses a non-loopback host (``check_host``)."""
    check_host(host, allow_remote)
    server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6}) if ":" in host else _Server
    try:
        httpd = server_class((host.strip("[]"), port), _Handler)
    except OSError as exc:
        raise GradeError(f"cannot serve the grading page on {host}:{port}: {exc.strerror or exc}") from None
    httpd.session = session
    bound = httpd.server_address[1]
    shown_host = f"[{host.strip('[]')}]" if ":" in host else host
    names = {shown_host.lower(), "localhost", "127.0.0.1", "[::1]"}
    httpd.allowed_hosts = None if allow_remote else {f"{name}:{bound}" for name in names}
    thread = threading.Thread(target=httpd.serve_forever, name="lensray-grade", daemon=True)
    thread.start()
    return GradingServer(f"http://{shown_host}:{bound}/", httpd, thread)
