"""Attacks on the arena's capacity, each written as the attack: uploads released together against
the daily limit, bodies larger than their route takes or sent without credentials, a database
kept busy, a recipe that expands to a billion values. On SQLite and PostgreSQL (``arena``)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import test_arena_service
from conftest import serve_in_thread
from sqlalchemy import func, select
from test_arena_service import RECIPE, _team

from mergearena.arena import service
from mergearena.arena.db import Submission, Team, lock_for_update, open_database
from mergearena.arena.web import ArenaSettings, create_app
from mergearena.arena.web.limits import SMALL_BODY_BYTES, upload_body_bytes
from mergearena.errors import LimitError

# The service tests' fixtures: a competition "demo" served by a test client, on each database.
arena = test_arena_service.arena
database_url = test_arena_service.database_url

MIB = 2**20
ATTACK_BYTES = 40 * MIB  # what the attacker sent
SAME_SITE = {"Origin": "http://127.0.0.1"}  # a form posted from the arena's own pages


def _body(total: int, chunk: int = MIB) -> Iterator[bytes]:
    block = b"\0" * chunk
    for _ in range(total // chunk):
        yield block


def _asgi_post(app, path: str, headers: dict[str, str], chunks: Iterator[bytes]):
    """POST to the app as a server does, handing it the body chunk by chunk when it asks;
    returns the status, the response headers and body, and how many body bytes it took."""
    taken = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal taken
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        taken += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body.decode(), taken


def _multipart(boundary: str = "b0undary") -> tuple[dict[str, str], bytes]:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="kit.tar"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return {"Content-Type": f"multipart/form-data; boundary={boundary}"}, head


def _count(sessions, model=Submission) -> int:
    with sessions() as session:
        return session.scalar(select(func.count(model.id)))


# ------------------------------------------------------------------------- the daily limit


def test_uploads_released_together_never_pass_the_daily_limit(arena, tmp_path: Path) -> None:
    """Issue 24 #3: with a limit of 1, two uploads released at the same moment were both
    accepted in most rounds. Each round a new team fires 3 uploads through a barrier."""
    _, sessions = arena
    with sessions() as session:
        spec = service.CompetitionSpec(
            slug="race", name="Race", allowed_models=["zoo:*"], daily_submissions=1
        )
        phase_id = service.add_phase(
            session, service.create_competition(session, spec), "validation", "validation"
        ).id
        session.commit()
    rounds, racers = 12, 3
    for round_number in range(rounds):
        with sessions() as session:
            team_id = service.register_team(session, f"racer {round_number}")[0].id
            session.commit()
        barrier = threading.Barrier(racers)
        outcomes: list[str] = []

        def race(racer: int, team_id: int = team_id, barrier=barrier, outcomes=outcomes) -> None:
            with sessions() as session:
                team = session.get(Team, team_id)
                phase = session.get(service.Phase, phase_id)
                _ = phase.competition.phases  # loaded before the start, as a request has it
                barrier.wait()
                try:
                    service.submit(session, tmp_path, team, phase, f"r{racer}", "r.yaml", RECIPE)
                    outcomes.append("accepted")
                except LimitError:
                    outcomes.append("limited")

        threads = [threading.Thread(target=race, args=(k,)) for k in range(racers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcomes) == ["accepted", "limited", "limited"], (round_number, outcomes)
    assert _count(sessions) == rounds


# ---------------------------------------------------------------------- what a body may cost


def test_an_upload_without_credentials_is_refused_before_its_body_is_read(arena) -> None:
    """Issue 24 #5: a 40 MiB upload without credentials was read and spooled in full before
    the 401. Now not one byte of it is read, on every upload route, API and pages alike."""
    client, sessions = arena
    content_type, _ = _multipart()
    declared = {**content_type, "Content-Length": str(ATTACK_BYTES)}
    for path, headers, problem in [
        ("/api/submissions", {}, "no API token given"),
        ("/api/submissions", {"Authorization": "Bearer ma_wrong"}, "not valid"),
        ("/api/submissions/1/writeup", {}, "no API token given"),
        ("/submit", {}, "no API token given"),
        ("/team/writeup", {"Cookie": "mergearena_team=ma_wrong", **SAME_SITE}, "not valid"),
        ("/api/baselines", {}, "no API token given"),
        ("/api/competitions/demo/phases/validation/tasks", {}, "no API token given"),
        ("/admin/tasks", {"Cookie": "mergearena_organizer=wrong", **SAME_SITE}, "not valid"),
    ]:
        status, _, body, taken = _asgi_post(
            client.app, path, {**declared, **headers}, _body(ATTACK_BYTES)
        )
        assert (status, taken) == (401, 0), (path, status, body, taken)
        assert problem in body, (path, body)
    assert _count(sessions) == 0


def test_a_body_over_its_cap_is_refused_without_reading_past_the_cap(arena, tmp_path) -> None:
    """Issue 24 #5: a declared length over the cap is refused unread; a chunked body, or one
    longer than its Content-Length said, is cut at the cap; nothing is stored."""
    client, sessions = arena
    team = _team(client, "alpha")
    content_type, head = _multipart()
    cap = upload_body_bytes()
    blobs = sorted((tmp_path / "blobs").rglob("*"))  # the fixture's task files

    def upload(headers: dict[str, str]):
        chunks = iter([head, *_body(ATTACK_BYTES)])
        return _asgi_post(
            client.app, "/api/submissions", {**content_type, **team, **headers}, chunks
        )

    status, _, body, taken = upload({"Content-Length": str(ATTACK_BYTES)})
    assert (status, taken) == (413, 0), body
    assert f"{cap:,} bytes at most with its form; this one is {ATTACK_BYTES:,} bytes" in body
    for lying in ({}, {"Content-Length": "1000"}):  # chunked, or a length that lies
        status, _, body, taken = upload(lying)
        assert status == 413 and "goes on past that" in body, body
        assert cap < taken <= cap + MIB, taken  # stopped at the first chunk over the cap
    # A route without an upload takes a small body only (registration: a JSON name).
    status, _, body, taken = _asgi_post(
        client.app, "/api/teams", {"Content-Type": "application/json"}, _body(ATTACK_BYTES, 4096)
    )
    assert status == 413 and f"may be {SMALL_BODY_BYTES:,} bytes at most" in body, body
    assert SMALL_BODY_BYTES < taken <= SMALL_BODY_BYTES + 4096, taken
    assert _count(sessions) == 0 and _count(sessions, Team) == 1
    assert sorted((tmp_path / "blobs").rglob("*")) == blobs


def _read_response(raw: socket.socket) -> str:
    """One HTTP response off a socket: its head, and its body by its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += raw.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        body += raw.recv(65536)
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def test_a_live_server_refuses_an_unauthenticated_upload_without_waiting_for_it(arena, tmp_path):
    """Over a real socket: the 401 comes back while the client has sent only the headers of
    its 40 MiB upload (before, the server waited for the whole body)."""
    _, sessions = arena
    served = create_app(ArenaSettings(sessions, tmp_path, "organizer-secret"))
    with serve_in_thread(served) as url:
        address = urlsplit(url)
        with socket.create_connection((address.hostname, address.port), timeout=5) as raw:
            raw.sendall(
                b"POST /api/submissions HTTP/1.1\r\nHost: arena\r\n"
                b"Content-Type: multipart/form-data; boundary=x\r\n"
                + f"Content-Length: {ATTACK_BYTES}\r\n\r\n".encode()
                + b"\0" * 1024
            )
            answer = _read_response(raw)
    assert answer.startswith("HTTP/1.1 401"), answer[:200]
    assert "no API token given" in answer
    assert _count(sessions) == 0


# ------------------------------------------------------------------------- a busy database


def _timed_get(url: str) -> float:
    started = time.perf_counter()
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


def test_a_busy_database_answers_503_while_board_reads_go_on(arena, database_url, tmp_path):
    """Issue 24 #4: parallel uploads froze the server (blocking database calls on the event
    loop, SQLite waiting up to 30 s for its lock) and some answered 500. With the team's lock
    held elsewhere, four uploads wait at most the web's lock timeout and answer 503 with
    Retry-After, while the board answers at once throughout."""
    client, sessions = arena
    headers = _team(client, "alpha")
    web = open_database(database_url, lock_timeout_seconds=1.0)
    served = create_app(ArenaSettings(web, tmp_path, "organizer-secret"))
    answers: list[httpx.Response] = []
    with serve_in_thread(served) as url, sessions() as holder:
        lock_for_update(holder, holder.scalars(select(Team)).one())  # a writer that lingers

        def upload(k: int) -> None:
            files = {"file": ("r.yaml", RECIPE)}
            answers.append(
                httpx.post(
                    f"{url}/api/submissions",
                    data={"name": f"u{k}"},
                    files=files,
                    headers=headers,
                    timeout=60,
                )
            )

        uploads = [threading.Thread(target=upload, args=(k,)) for k in range(4)]
        started = time.perf_counter()
        for thread in uploads:
            thread.start()
        reads = []
        while any(t.is_alive() for t in uploads) and time.perf_counter() - started < 20:
            reads.append(_timed_get(f"{url}/api/leaderboard"))
            time.sleep(0.05)
        for thread in uploads:
            thread.join()
        waited = time.perf_counter() - started
        holder.rollback()
        after = httpx.post(
            f"{url}/api/submissions", files={"file": ("r.yaml", RECIPE)}, headers=headers
        )
    assert [a.status_code for a in answers] == [503] * 4, [a.text for a in answers]
    assert all(a.headers["Retry-After"].isdigit() for a in answers)
    assert "database is busy" in answers[0].json()["detail"]
    assert waited < 8, waited  # each waited about the 1 s lock timeout, not 30 s
    assert len(reads) >= 3 and max(reads) < 1.0, reads
    assert after.status_code == 201, after.text


# ------------------------------------------------------------------------- a hostile recipe


def _alias_bomb(levels: int = 10) -> bytes:
    """A "billion laughs": each level lists the one before 9 times, 9**10 > 3e9 leaves."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{k}: &l{k} [" + ",".join([f"*l{k - 1}"] * 9) + "]" for k in range(1, levels)]
    return ("\n".join(lines) + "\nmerge_method: linear\n").encode()


def test_a_recipe_alias_bomb_is_refused_at_once_while_the_board_answers(arena, tmp_path) -> None:
    """Issue 24 #9: a YAML alias bomb kept the recipe parser busy 98 s, ending in MemoryError,
    in the server process. Four uploaded together are each refused within 2 s, with the reason,
    and the board keeps answering."""
    client, sessions = arena
    headers = _team(client, "alpha")
    served = create_app(ArenaSettings(sessions, tmp_path, "organizer-secret"))
    answers: list[tuple[float, httpx.Response]] = []
    with serve_in_thread(served) as url:

        def upload() -> None:
            started = time.perf_counter()
            files = {"file": ("bomb.yaml", _alias_bomb())}
            sent = httpx.post(f"{url}/api/submissions", files=files, headers=headers, timeout=30)
            answers.append((time.perf_counter() - started, sent))

        uploads = [threading.Thread(target=upload) for _ in range(4)]
        for thread in uploads:
            thread.start()
        reads = [_timed_get(f"{url}/api/leaderboard") for _ in range(3)]
        for thread in uploads:
            thread.join()
    for seconds, sent in answers:
        assert sent.status_code == 400 and seconds < 2, (seconds, sent.text)
        assert "the recipe is invalid" in sent.json()["detail"] and "YAML" in sent.json()["detail"]
    assert max(reads) < 1.0, reads
    assert _count(sessions) == 0
