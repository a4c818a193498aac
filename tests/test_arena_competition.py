"""A whole competition, run as it was run, end to end on the zoo: the organizer sets it up in a
real browser (three phases, tasks, a calibration file, a baseline), two teams submit (a recipe
through the form, code over the API), the sandboxed worker scores everything, a team attaches a
write-up and picks its final, the organizer runs the finals on frozen code, closes the final
phase and marks the winners, and anyone reads the winners page without JavaScript."""

from __future__ import annotations

import csv
import io
import shutil
import textwrap
from pathlib import Path

import httpx
import pytest
from conftest import serve_in_thread

from mergearena.arena.db import open_database
from mergearena.arena.sandbox import sandbox_available
from mergearena.arena.web import ArenaSettings, create_app
from mergearena.arena.worker import WorkerSettings, work_once

playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.zoo,
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt install chromium)"),
    pytest.mark.skipif(sandbox_available() is not None, reason="needs the bwrap sandbox"),
]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
ORGANIZER_TOKEN = "organizer-secret"
ROWS = 6
WRITEUP = """# One expert is enough

We merged nothing: <script>document.title = 'owned'</script> the sentiment expert alone.
"""
# Team beta's code: mergearena's method API in one file, reading the calibration file the
# organizer attached (every job sees it read-only) before it merges.
BETA_CODE = textwrap.dedent("""\
    import csv, os
    path = os.path.join(os.environ["MERGEARENA_CALIBRATION"], "calib.csv")
    rows = list(csv.DictReader(open(path)))
    print(f"calibration rows: {len(rows)}")
    RECIPE = {
        "merge_method": "linear",
        "models": [
            {"model": "zoo:sentiment", "parameters": {"weight": 0.7}},
            {"model": "zoo:spam", "parameters": {"weight": 0.3}},
        ],
    }
    """)


_ONE_MODEL = "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0}}\n"


def _rows(path: Path, start: int, count: int) -> str:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(
        [rows[0], *rows[1 + start : 1 + start + count]]
    )
    return buffer.getvalue()


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    """What the organizer and the teams upload, as files on disk for the browser."""
    from mergearena.checkpoints.refs import model_ref_exists
    from mergearena.zoo.prepare import task_files

    if not model_ref_exists("zoo:smollm2-135m"):
        pytest.skip("the zoo is not prepared: run `mergearena zoo prepare`")
    (sentiment,) = task_files("validation", ["sentiment"])
    (spam,) = task_files("test", ["spam"])
    (final,) = task_files("test", ["sentiment"])
    contents = {
        "validation.csv": _rows(sentiment, 0, ROWS),
        "public.csv": _rows(spam, 0, ROWS),
        "final.csv": _rows(final, ROWS, ROWS),  # new inputs, never seen in a public phase
        "calib.csv": _rows(sentiment, 100, 3),
        "base.yaml": _ONE_MODEL.format("zoo:smollm2-135m"),
        "alpha.yaml": _ONE_MODEL.format("zoo:sentiment"),
        "beta.py": BETA_CODE,
        "writeup.md": WRITEUP,
    }
    for name, content in contents.items():
        (tmp_path / name).write_text(content)
    return {name: tmp_path / name for name in contents}


def test_a_whole_competition_runs_end_to_end(tmp_path: Path, files: dict[str, Path]) -> None:
    data_dir = tmp_path / "data"
    sessions = open_database(f"sqlite:///{tmp_path / 'arena.db'}")
    app = create_app(ArenaSettings(sessions, data_dir, ORGANIZER_TOKEN))
    worker = WorkerSettings(data_dir=data_dir, dtype="float32", scratch_dir=tmp_path / "jobs")

    def run_queue() -> list:
        done = []
        while (job := work_once(sessions, worker)) is not None:
            assert job.status == "scored", (job.name, job.error, job.log)
            done.append(job)
        return done

    with serve_in_thread(app) as url, playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        api = httpx.Client(base_url=url)

        # --- the organizer sets the competition up on the organizer page
        organizer = browser.new_page()
        organizer.goto(f"{url}/admin")
        organizer.fill("input[name=token]", ORGANIZER_TOKEN)
        organizer.click("button[type=submit]")
        form = organizer.locator("form[action='/admin/competitions']")
        form.locator("input[name=slug]").fill("zoo-cup")
        form.locator("input[name=name]").fill("The zoo cup")
        form.locator("input[name=allowed_models]").fill("zoo:*")
        form.locator("input[name=daily_submissions]").fill("5")
        form.locator("input[name=max_parameters_billions]").fill("0.2")
        form.locator("input[name=memory_limit_gib]").fill("")
        form.locator("button").click()

        def admin_form(action: str, **fields: str) -> None:
            """Fill one of the organizer page's forms (by its action or a selector), send it."""
            selector = action if action.startswith("form") else f"form[action='{action}']"
            form = organizer.locator(selector).first
            for name, value in fields.items():
                field = form.locator(f"[name={name}]")
                if name == "file":
                    field.set_input_files(str(files[value]))
                elif name in ("kind", "track"):
                    field.select_option(value)
                else:
                    field.fill(value)
            form.locator("button").click()
            assert organizer.url.endswith("/admin"), organizer.inner_text("body")

        admin_form("/admin/phases", name="public-test", kind="public_test")
        admin_form("/admin/phases", name="final", kind="final")
        for phase, task, file in (
            ("validation", "sentiment", "validation.csv"),
            ("public-test", "spam", "public.csv"),
            ("final", "sentiment", "final.csv"),
        ):
            admin_form("/admin/tasks", phase=phase, name=task, file=file)
        admin_form("/admin/calibration", name="calib", file="calib.csv")
        admin_form("/admin/baselines", phase="validation", name="base model", file="base.yaml")
        listed = organizer.inner_text("body")
        assert "validation (validation)" in listed and "final (final)" in listed
        assert "calib (3)" in listed

        # --- team alpha registers and submits a recipe through the forms
        alpha = browser.new_page()
        alpha.goto(f"{url}/register")
        alpha.fill("input[name=name]", "alpha")
        alpha.click("button[type=submit]")
        assert alpha.inner_text("#token").startswith("ma_")
        alpha.goto(f"{url}/submit")
        alpha.fill("input[name=phase]", "validation")
        alpha.fill("input[name=name]", "sentiment expert")
        alpha.set_input_files("input[name=file]", str(files["alpha.yaml"]))
        alpha.click("button[type=submit]")
        assert "is queued" in alpha.inner_text("#submitted")

        # --- team beta registers and submits code over the API, to two phases
        beta_token = api.post("/api/teams", json={"name": "beta"}).json()["token"]
        beta = {"Authorization": f"Bearer {beta_token}"}
        for phase in ("validation", "public-test"):
            queued = api.post(
                "/api/submissions",
                data={"name": f"calibrated {phase}", "phase": phase},
                files={"file": ("beta.py", files["beta.py"].read_bytes())},
                headers=beta,
            )
            assert queued.status_code == 201 and queued.json()["kind"] == "code", queued.text
        assert len(run_queue()) == 4

        # --- the validation board: every entrant, the costs, the charts, the efficiency track
        board = api.get("/api/leaderboard", params={"phase": "validation"}).json()
        averages = {r["team"]: r["average"] for r in board["rows"]}
        assert set(averages) == {"alpha", "beta", "mergearena baselines"}
        assert all(r["costs"]["seconds"] > 0 for r in board["rows"])
        bar = averages["mergearena baselines"]
        assert [r["team"] for r in board["efficiency"]] == sorted(
            (t for t in ("alpha", "beta") if averages[t] > bar),
            key=lambda t: next(r["costs"]["seconds"] for r in board["rows"] if r["team"] == t),
        )
        viewer = browser.new_context(java_script_enabled=False).new_page()
        viewer.goto(f"{url}/c/zoo-cup?phase=validation")
        assert viewer.locator("#leaderboard tbody tr").count() == 3
        assert viewer.locator("#progress svg").count() == 1
        assert viewer.locator("#distribution svg").count() == 1
        assert viewer.locator("#efficiency tbody tr").count() == max(1, len(board["efficiency"]))
        mine = api.get("/api/teams/me", headers=beta).json()["submissions"]
        assert all("calibration rows: 3" in s["log"] for s in mine), mine[0]["log"]
        public = api.get(f"/api/submissions/{mine[0]['id']}").json()
        assert "log" not in public  # the log is its team's

        # --- alpha attaches a write-up and makes its submission its final, on its team page
        alpha.goto(f"{url}/team")
        alpha.locator("form[action='/team/writeup'] input[name=file]").set_input_files(
            str(files["writeup.md"])
        )
        alpha.locator("form[action='/team/writeup'] button").click()
        assert "One expert is enough" in alpha.inner_text("table")
        alpha.locator("form[action='/team/final'] button").click()
        assert "Your final" in alpha.inner_text("table")

        # --- the finals: frozen files, new inputs, scores hidden until the phase closes
        organizer.goto(f"{url}/admin")
        admin_form("/admin/finals")
        assert len(run_queue()) == 3
        reruns = _reruns(sessions)
        validation = {r["team"]: r["submission_id"] for r in board["rows"]}
        beta_public = next(s["id"] for s in mine if s["phase"] == "public-test")
        assert {team: source for team, (source, _) in reruns.items()} == {
            "alpha": validation["alpha"],  # its pick
            "beta": beta_public,  # its best on the latest public phase it entered
            "mergearena baselines": validation["mergearena baselines"],
        }
        assert all(same_files for _, same_files in reruns.values())  # frozen code
        viewer.goto(f"{url}/c/zoo-cup?phase=final")
        assert "revealed when the organizer closes it" in viewer.inner_text("body")
        assert viewer.locator("svg").count() == 0
        hidden = api.get("/api/leaderboard", params={"phase": "final"}).json()
        assert all(r["average"] is None and r["rank"] is None for r in hidden["rows"])
        organizer.goto(f"{url}/admin")
        organizer.locator("li", has_text="final (final)").locator("button").click()
        final = api.get("/api/leaderboard", params={"phase": "final"}).json()
        assert [r["rank"] for r in final["rows"]] == [1, 2, 3]
        winner = next(r for r in final["rows"] if not r["baseline"])

        # --- the organizer marks the winners of the three tracks
        for track, submission_id in (
            ("performance", winner["submission_id"]),
            ("efficiency", (final["efficiency"] or [winner])[0]["submission_id"]),
            ("creative", validation["alpha"]),  # the submission its write-up is attached to
        ):
            organizer.goto(f"{url}/admin")
            admin_form("form.mark-winner", track=track, submission_id=str(submission_id))

        # --- anyone reads the winners page and the winning write-up, without JavaScript
        viewer.goto(f"{url}/c/zoo-cup/winners")
        assert winner["team"] in viewer.inner_text("#track-performance")
        assert "Not announced" not in viewer.inner_text("body")
        viewer.locator("#track-creative a", has_text="One expert is enough").click()
        article = viewer.inner_text("#writeup")
        assert "<script>document.title = 'owned'</script>" in article  # shown, as text
        assert viewer.locator("#writeup script").count() == 0
        assert viewer.title() != "owned"
        browser.close()


def _reruns(sessions) -> dict[str, tuple[int, bool]]:
    """Each team's finals rerun: its source submission, and whether it ran the same files."""
    from sqlalchemy import select

    from mergearena.arena.db import Submission

    with sessions() as session:
        reruns = session.scalars(select(Submission).where(Submission.rerun_of.is_not(None)))
        return {
            rerun.team.name: (
                rerun.rerun_of,
                rerun.file_sha256 == session.get(Submission, rerun.rerun_of).file_sha256,
            )
            for rerun in reruns
        }
