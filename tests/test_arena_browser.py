"""A real browser (Playwright driving Debian's headless Chromium) submits a recipe through the
form, a worker scores it, and the leaderboard page shows it."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
from conftest import serve_in_thread

from mergearena.arena import service
from mergearena.arena.db import open_database
from mergearena.arena.sandbox import sandbox_available
from mergearena.arena.web import ArenaSettings, create_app
from mergearena.arena.worker import WorkerSettings, work_once

playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt install chromium)"),
    pytest.mark.skipif(sandbox_available() is not None, reason="needs the bwrap sandbox"),
]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # Chromium's own sandbox needs a non-root user
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MC = (
    "id,input,target,answer_choices,eval_type\n"
    "q1,Is the sky blue?,0,\"['yes', 'no']\",multiple_choice\n"
    "q2,Is fire cold?,1,\"['yes', 'no']\",multiple_choice\n"
)


@pytest.fixture()
def server(tmp_path: Path, make_checkpoint):
    base = make_checkpoint("llama", seed=0, name="base")
    for path in base.iterdir():
        path.chmod(0o644)  # the sandbox user reads it
    data_dir = tmp_path / "data"
    sessions = open_database(f"sqlite:///{tmp_path / 'arena.db'}")
    with sessions() as session:
        competition = service.create_competition(
            session,
            service.CompetitionSpec(
                slug="tiny", name="Tiny arena", allowed_models=[str(base)], memory_limit_bytes=None
            ),
        )
        phase = service.add_phase(session, competition, "validation", "validation")
        service.add_task(session, data_dir, phase, "mc", MC.encode())
        _team, token = service.register_team(session, "browser team")
        session.commit()
    app = create_app(ArenaSettings(sessions, data_dir, "organizer"))
    worker = WorkerSettings(data_dir=data_dir, dtype="float32", scratch_dir=tmp_path / "jobs")
    with serve_in_thread(app) as url:
        yield url, token, base, lambda: work_once(sessions, worker)


def test_a_form_submission_appears_on_the_leaderboard(server, tmp_path: Path) -> None:
    url, token, base, run_worker = server
    recipe = tmp_path / "soup.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
            merge_method: linear
            models:
              - model: {base}
                parameters: {{weight: 1.0}}
            """)
    )
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(f"{url}/c/tiny")
        assert "No scored submissions yet" in page.inner_text("#leaderboard")

        page.goto(f"{url}/team")  # sign in: the form uploads as the signed-in team
        page.fill("input[name=token]", token)
        page.click("button[type=submit]")
        page.goto(f"{url}/submit")
        page.select_option("select[name=competition]", "tiny")
        page.fill("input[name=name]", "my <b>soup</b>")
        page.set_input_files("input[name=file]", str(recipe))
        page.click("button[type=submit]")
        assert "is queued" in page.inner_text("#submitted")

        done = run_worker()
        assert done is not None and done.status == "scored", done and done.log

        page.goto(f"{url}/c/tiny")
        board = page.inner_text("#leaderboard")
        assert "my <b>soup</b>" in board and "browser team" in board  # shown as text
        assert page.locator("#leaderboard b").count() == 0  # and never as markup
        row = page.locator("#leaderboard tbody tr").first.inner_text()
        assert f"{100 * done.average:.1f}" in row
        page.goto(f"{url}/team")  # the team page shows it
        assert "scored" in page.inner_text("table")
        browser.close()
