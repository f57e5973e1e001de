"""lensray.grade: the grades file (append, resume, merge, catalogue), the grading order, the loopback-only
server, and the page driven in headless Chromium with real key presses.

The browser is driven over Chromium's DevTools protocol on ``--remote-debugging-pipe`` (file descriptors 3
and 4, NUL-separated JSON): the standard library is enough, no websocket client and no port. Keys reach the
page as ``Input.dispatchKeyEvent``, the same path as a keyboard's; the page has no test hook. Chromium comes
from Debian (``apt-get install -y chromium``); without it the browser test is skipped, unless ``CI`` is set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from lensray.cli import main
from lensray.config import DataConfig
from lensray.grade.candidates import read_candidates, select
from lensray.grade.grades import GRADE_COLUMNS, GradeBook, GradeError, grade_record, journal_path, read_grades
from lensray.grade.server import GradingServer, check_host, grading_session, serve
from lensray.sky.bands import BAND_NAMES, BANDS, band_relpath
from lensray.sky.catalog import label_ids, load_catalog

IDS = (200011, 200012, 200013, 200014, 200015)


def write_candidates(root: Path, ids: tuple[int, ...] = IDS, with_images: bool = True) -> str:
    """Tiny challenge-layout cutouts (a blob on noise, VIS 200 px, NIR 66 px) and a candidates Parquet."""
    rng = np.random.default_rng(3)
    if with_images:
        for object_id in ids:
            for band in BAND_NAMES:
                size = BANDS[band].size
                y, x = np.mgrid[:size, :size] - size / 2
                image = 1e-11 * (rng.normal(size=(size, size)) + 20 * np.exp(-(x**2 + y**2) / (0.02 * size**2)))
                path = root / "raw" / band_relpath(band, object_id)
                path.parent.mkdir(parents=True, exist_ok=True)
                fits.PrimaryHDU(image.astype(np.float32)).writeto(path)
    scores = np.linspace(0.95, 0.55, len(ids))
    frame = pd.DataFrame(
        {
            "rank": np.arange(1, len(ids) + 1),
            "id": np.asarray(ids, np.int64),
            "score": scores,
            "score_std": np.linspace(0.01, 0.2, len(ids))[::-1],
            "ra": 150.0 + np.arange(len(ids)) / 100,
            "dec": 2.0 - np.arange(len(ids)) / 100,
        }
    )
    url = str(root / "candidates.parquet")
    frame.to_parquet(url, index=False)
    return url


def candidate(object_id: int, rank: int = 1, score: float = 0.9) -> dict[str, Any]:
    return {"id": object_id, "rank": rank, "score": score, "ra": 10.0, "dec": -5.0}


# --- the grades file ----------------------------------------------------------------------------------


def test_each_grade_is_in_the_journal_and_the_parquet_at_once_and_a_restart_resumes(tmp_path: Path) -> None:
    out = tmp_path / "grades.parquet"
    book = GradeBook(out)
    book.add(grade_record(candidate(1), "a", "clear ring", "ana"))
    assert read_grades(str(out))[["id", "grade", "note"]].values.tolist() == [[1, "A", "clear ring"]]
    book.add(grade_record(candidate(2, 2), "X", "", "ana"))
    book.add(grade_record(candidate(1), "B", "on second look", "ana"))  # a regrade: the latest wins
    assert len(journal_path(out).read_text().splitlines()) == 3

    with open(journal_path(out), "a") as stream:  # a crash mid-append leaves a torn last line
        stream.write('{"id": 3, "grader": "ana", "gra')
    again = GradeBook(out)
    assert sorted((r["id"], r["grade"]) for r in again.grades_of("ana").values()) == [(1, "B"), (2, "X")]
    again.add(grade_record(candidate(3, 3), "C", "", "ana"))  # starts on a line of its own
    grades = read_grades(str(out))
    assert list(grades.columns) == list(GRADE_COLUMNS)
    assert dict(zip(grades["id"], grades["grade"], strict=True)) == {1: "B", 2: "X", 3: "C"}
    assert grades["ra"].tolist() == [10.0, 10.0, 10.0] and grades["score_std"].isna().all()
    with pytest.raises(GradeError, match="grade 'Q' for ID 4"):
        grade_record(candidate(4), "Q", "", "ana")


def test_merge_keeps_each_graders_latest_grade_as_its_own_row(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    first, second = GradeBook(tmp_path / "a.parquet"), GradeBook(tmp_path / "b.parquet")
    first.add(grade_record(candidate(1), "A", "", "ana", "2026-01-01T10:00:00+00:00"))
    first.add(grade_record(candidate(2), "X", "", "ana", "2026-01-01T10:01:00+00:00"))
    second.add(grade_record(candidate(2), "B", "arc after all", "ana", "2026-01-02T09:00:00+00:00"))
    second.add(grade_record(candidate(1), "X", "", "ben", "2026-01-01T11:00:00+00:00"))

    assert main(["grade-merge", str(first.out), str(second.out), "--out", str(tmp_path / "m.parquet")]) == 0
    assert "merged 3 grades (ana 2, ben 1; 1 superseded" in capsys.readouterr().out
    merged = read_grades(str(tmp_path / "m.parquet"))
    rows = sorted(zip(merged["grader"], merged["id"], merged["grade"], strict=True))
    assert rows == [("ana", 1, "A"), ("ana", 2, "B"), ("ben", 1, "X")]


def test_grades_become_a_catalogue_that_preprocess_reads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    book = GradeBook(tmp_path / "g.parquet")
    for object_id, grade in [(1, "A"), (2, "B"), (3, "C"), (4, "X"), (5, "A"), (6, "A")]:
        book.add(grade_record(candidate(object_id), grade, "", "ana"))
    book.add(grade_record(candidate(5), "X", "", "ben"))  # 5: one A, one X -> left out
    book.add(grade_record(candidate(6), "C", "", "ben"))  # 6: A and C -> a lens
    out = str(tmp_path / "labels.parquet")
    assert main(["grades-to-catalog", str(book.out), "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "4 labelled IDs (3 lenses from A/B, 1 non-lenses from X)" in printed
    assert "1 graded C only, 1 with graders split evenly" in printed

    catalog = load_catalog(out, DataConfig(label_column="label", coord_columns=("ra", "dec")))
    labelled = label_ids(catalog, DataConfig(label_column="label"))
    assert dict(zip(labelled.ids.tolist(), labelled.labels.tolist(), strict=True)) == {1: 1, 2: 1, 4: 0, 6: 1}
    assert catalog.candidate_columns()["ra"].tolist() == [10.0] * 4


# --- which to grade -----------------------------------------------------------------------------------


def test_orders_and_the_blind_random_slice_below_the_top(tmp_path: Path) -> None:
    ids = tuple(range(100, 120))
    frame = read_candidates(write_candidates(tmp_path, ids, with_images=False))
    assert select(frame).frame["id"].tolist() == list(ids)
    by_std = select(frame, "uncertainty", top=3).frame["id"].tolist()
    assert by_std == [100, 101, 102]  # score_std falls with rank in this file
    no_std = read_candidates(write_candidates(tmp_path, ids, with_images=False)).drop(columns="score_std")
    assert select(no_std, "uncertainty", top=2).frame["id"].tolist() == [119, 118]  # scores nearest 0.5
    mixed = select(no_std, "mix", top=4).frame["id"].tolist()
    assert mixed == [100, 119, 101, 118]

    chosen = select(frame, "score", top=5, random_low=4, seed=1).frame
    assert len(chosen) == 9 and chosen["random_low"].sum() == 4
    assert (chosen.loc[chosen["random_low"], "rank"] > 5).all()
    low = chosen[chosen["random_low"]].iloc[0].to_dict()
    assert grade_record(low, "X", "", "ana")["random_low"] is True  # the grades file says which were random
    assert chosen["id"].tolist() == select(frame, "score", top=5, random_low=4, seed=1).frame["id"].tolist()
    with pytest.raises(GradeError, match="--random-low N needs --top K"):
        select(frame, random_low=2)
    with pytest.raises(GradeError, match="only 0 candidates rank below the top 20"):
        select(frame, top=20, random_low=1)


# --- the server ---------------------------------------------------------------------------------------


def test_a_non_loopback_host_is_refused_unless_allowed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        check_host(host, allow_remote=False)
    with pytest.raises(GradeError, match="refusing to serve the grading page on 0.0.0.0"):
        check_host("0.0.0.0", allow_remote=False)
    check_host("0.0.0.0", allow_remote=True)

    args = ["grade", "--candidates", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "g.parquet")]
    assert main([*args, "--host", "192.168.1.7"]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("lensray grade: refusing to serve the grading page on 192.168.1.7") and "--allow-remote" in err
    )


@pytest.fixture()
def page(tmp_path: Path) -> Iterator[GradingServer]:
    session = grading_session(
        write_candidates(tmp_path), str(tmp_path / "grades.parquet"), images_url=str(tmp_path / "raw"), grader="ana"
    )
    server = serve(session, "127.0.0.1", 0)
    try:
        yield server
    finally:
        server.close()


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_pictures_and_what_the_server_refuses(page: GradingServer, tmp_path: Path) -> None:
    status, png = _get(f"{page.url}img/{IDS[0]}/rgb.png")
    assert status == 200 and png.startswith(b"\x89PNG")
    status, _ = _get(f"{page.url}img/{IDS[0]}/Y.png")
    assert status == 200
    (tmp_path / "raw" / band_relpath("J", IDS[1])).unlink()
    status, body = _get(f"{page.url}img/{IDS[1]}/rgb.png")
    assert status == 404 and f"ID {IDS[1]} band J" in json.loads(body)["error"]
    status, body = _get(f"{page.url}api/state", {"Host": f"attacker.example:{page.httpd.server_address[1]}"})
    assert status == 403
    form = urllib.request.Request(f"{page.url}api/grade", data=b"id=1&grade=A", method="POST")
    form.add_header("Content-Type", "application/x-www-form-urlencoded")
    with pytest.raises(urllib.error.HTTPError, match="400"):
        urllib.request.urlopen(form, timeout=30)


# --- the page in a real browser -----------------------------------------------------------------------


class DevTools:
    """Chromium's DevTools protocol over ``--remote-debugging-pipe``: commands on fd 3, answers on fd 4."""

    def __init__(self, browser: str, profile: Path) -> None:
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
        command = [*flags, "--disable-component-update", "--remote-debugging-pipe", f"--user-data-dir={profile}"]
        # A Python trampoline puts the pipe ends on the descriptors Chromium reads (3: commands) and writes
        # (4: answers), then execs it (dash's `3<&N` takes one digit only; pytest's capture uses low fds).
        trampoline = (
            "import fcntl, os, sys; r, w = (fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[1:3]); "
            "os.dup2(r, 3); os.dup2(w, 4); os.execvp(sys.argv[3], sys.argv[3:])"
        )
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                trampoline,
                str(to_browser_r),
                str(from_browser_w),
                browser,
                *command,
                "about:blank",
            ],
            pass_fds=(to_browser_r, from_browser_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next, self._answers, self._buffer = 0, {}, b""
        self._arrived = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def _read(self) -> None:
        while chunk := os.read(self._from_browser, 1 << 16):
            self._buffer += chunk
            *messages, self._buffer = self._buffer.split(b"\0")
            with self._arrived:
                for message in map(json.loads, messages):
                    if "id" in message:
                        self._answers[message["id"]] = message
                self._arrived.notify_all()

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        with self._arrived:
            assert self._arrived.wait_for(lambda: self._next in self._answers, timeout=60), f"{method}: no answer"
            answer = self._answers.pop(self._next)
        assert "error" not in answer, f"{method}: {answer['error']}"
        return answer["result"]

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", True, expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            assert time.monotonic() < deadline, f"the page never got to: {expression}"
            time.sleep(0.05)

    def press(self, key: str) -> None:
        """One key, down and up, as the keyboard sends it (text keys also type their character)."""
        special = {"Enter": ("Enter", 13, "\r")}
        code, vk, text = special.get(key) or (f"Key{key.upper()}" if key.isalpha() else "", ord(key.upper()), key)
        down = {"type": "keyDown", "key": key, "code": code, "windowsVirtualKeyCode": vk, "text": text}
        self.call("Input.dispatchKeyEvent", True, **down)
        self.call("Input.dispatchKeyEvent", True, type="keyUp", key=key, code=code, windowsVirtualKeyCode=vk)

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)
        os.close(self._to_browser)


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI"):
        pytest.fail("CI is set but no Chromium was found: `apt-get install -y chromium`")
    pytest.skip("headless Chromium is not installed (apt-get install -y chromium); CI installs it")


def _open(chrome: DevTools, url: str) -> None:
    chrome.call("Page.navigate", True, url=url)
    chrome.wait_for("document.readyState === 'complete' && document.body.dataset.ready === '1'")


def _text(chrome: DevTools, element: str) -> str:
    return chrome.evaluate(f"document.getElementById('{element}').textContent")


def test_keys_grade_in_chromium_and_a_reload_resumes(page: GradingServer, tmp_path: Path) -> None:
    chrome = DevTools(_browser(), tmp_path / "profile")
    try:
        _open(chrome, page.url)
        assert _text(chrome, "progress") == "0 of 5 graded" and _text(chrome, "position") == "candidate 1 of 5"
        pictures = "[...document.querySelectorAll('#pictures img')]"
        chrome.wait_for(f"{pictures}.length === 5 && {pictures}.every(i => i.complete && i.naturalWidth > 0)")
        assert chrome.evaluate(f"{pictures}.map(i => i.alt)") == ["rgb", "VIS", "Y", "J", "H"]

        chrome.press("a")
        chrome.wait_for("document.getElementById('progress').textContent === '1 of 5 graded'")
        chrome.press("x")
        chrome.wait_for("document.getElementById('progress').textContent === '2 of 5 graded'")
        chrome.press("n")  # into the note field; its characters are typed, not taken as grades
        for key in "faint arc":
            chrome.press(key)
        chrome.press("Enter")  # out of the note field
        chrome.press("c")
        chrome.wait_for("document.getElementById('progress').textContent === '3 of 5 graded'")

        grades = read_grades(str(page.httpd.session.book.out))
        assert sorted(zip(grades["id"], grades["grade"], grades["note"], strict=True)) == [
            (IDS[0], "A", ""),
            (IDS[1], "X", ""),
            (IDS[2], "C", "faint arc"),
        ]
        assert set(grades["grader"]) == {"ana"} and grades["score"].notna().all()

        _open(chrome, page.url)  # a reload: the page starts where the grading stopped
        assert _text(chrome, "progress") == "3 of 5 graded"
        assert _text(chrome, "position") == "candidate 4 of 5"
        assert f"ID {IDS[3]}" in _text(chrome, "facts")
        chrome.press("g")  # the grid: every candidate with its grade
        chrome.wait_for("document.querySelectorAll('#grid .cell').length === 5")
        assert chrome.evaluate("[...document.querySelectorAll('#grid .badge')].map(b => b.textContent)") == [
            *"AXC",
            "",
            "",
        ]
    finally:
        chrome.close()
