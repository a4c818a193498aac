"""Scoring outside the sandbox: what the run wrote is checked again, never trusted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mergearena.arena.scoring import RejectedOutput, score_task
from mergearena.evaluation import Task, load_task
from mergearena.evaluation.metrics import generation_metrics

HIDDEN_MC = (
    "id,input,target,answer_choices,eval_type\n"
    "q1,Is the sky blue?,0,\"['yes', 'no']\",multiple_choice\n"
    "q2,Is fire cold?,1,\"['yes', 'no']\",multiple_choice\n"
)
HIDDEN_GEN = "id,input,target,answer_choices,eval_type\ng1,Say hi,hi,,generation\n"


def hidden(tmp_path: Path, name: str, text: str) -> Task:
    path = tmp_path / "hidden" / f"{name}.csv"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return load_task(path)


def predictions_file(work: Path, name: str, text: str) -> Path:
    path = work / "out" / "predictions" / f"{name}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_valid_predictions_are_scored(tmp_path):
    work = tmp_path / "work"
    mc = predictions_file(work, "mc", "id,prediction\nq2,0\nq1,0\n")  # any row order
    assert score_task(hidden(tmp_path, "mc", HIDDEN_MC), mc, root=work).value == 0.5
    # -1: no answer (a chain of thought that read no letter), counted wrong and not refused
    missed = predictions_file(work, "mc", "id,prediction\nq1,-1\nq2,1\n")
    assert score_task(hidden(tmp_path, "mc", HIDDEN_MC), missed, root=work).value == 0.5
    gen = predictions_file(work, "gen", "id,prediction\ng1,hi there\n")
    expected = generation_metrics("hi there", "hi")["rougeL"]
    assert score_task(hidden(tmp_path, "gen", HIDDEN_GEN), gen, root=work).value == expected


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        ("q1,0\n", "1 row id(s) without a prediction: 'q2'"),
        ("q1,0\nq2,1\nq3,0\n", "row id 'q3' (line 4): not an id of this task"),
        ("q1,0\nq2,1\nq1,1\n", "row id 'q1' (line 4): predicted twice (first on line 2)"),
        ("q1,2\nq2,1\n", "row id 'q1' (line 2): '2' is not a choice index (0 to 1, or -1"),
        ("q1,-2\nq2,1\n", "row id 'q1' (line 2): '-2' is not a choice index"),
        ("q1,yes\nq2,1\n", "row id 'q1' (line 2): 'yes' is not a choice index"),
        ("q1,0,1\nq2,1\n", "line 2: 3 field(s), not 2 (id,prediction)"),
    ],
)
def test_broken_predictions_are_refused_naming_the_rows(tmp_path, rows, problem):
    work = tmp_path / "work"
    path = predictions_file(work, "mc", "id,prediction\n" + rows)
    with pytest.raises(RejectedOutput) as caught:
        score_task(hidden(tmp_path, "mc", HIDDEN_MC), path, root=work)
    message = str(caught.value)
    assert message.startswith("mc: predictions refused: ") and problem in message, message


def test_a_file_without_the_header_is_refused(tmp_path):
    work = tmp_path / "work"
    path = predictions_file(work, "mc", "prediction,id\n0,q1\n1,q2\n")
    with pytest.raises(RejectedOutput, match="not the header id,prediction"):
        score_task(hidden(tmp_path, "mc", HIDDEN_MC), path, root=work)


def test_only_regular_files_inside_the_job_are_read(tmp_path):
    task = hidden(tmp_path, "mc", HIDDEN_MC)
    work = tmp_path / "work"
    outside = tmp_path / "host"
    outside.mkdir()
    (outside / "mc.csv").write_text("id,prediction\nq1,0\nq2,1\n")
    path = work / "out" / "predictions" / "mc.csv"

    with pytest.raises(RejectedOutput, match="out/predictions/mc.csv: missing"):
        score_task(task, path, root=work)
    path.parent.mkdir(parents=True)
    path.symlink_to(outside / "mc.csv")  # a link to a host file
    with pytest.raises(RejectedOutput, match="a link, not a file"):
        score_task(task, path, root=work)
    path.unlink()
    path.parent.rmdir()
    path.parent.symlink_to(outside)  # a linked directory
    with pytest.raises(RejectedOutput, match="a link, not a file"):
        score_task(task, path, root=work)
    path.parent.unlink()
    path.parent.mkdir()
    os.mkfifo(path)  # would block a plain open()
    with pytest.raises(RejectedOutput, match="not a regular file"):
        score_task(task, path, root=work)


def test_a_huge_or_non_utf8_predictions_file_is_refused_unread(tmp_path):
    task = hidden(tmp_path, "mc", HIDDEN_MC)
    work = tmp_path / "work"
    path = predictions_file(work, "mc", "id,prediction\nq1,0\nq2,1\n")
    with path.open("r+b") as handle:  # 1 GiB, sparse: no disk or memory spent
        handle.truncate(2**30)
    with pytest.raises(RejectedOutput, match="larger than 268,435,456 bytes"):
        score_task(task, path, root=work)
    path.write_bytes(b"id,prediction\nq1,0\nq2,\xff\xfe\n")
    with pytest.raises(RejectedOutput, match=r"not UTF-8 text \(byte 0xff on line 3\)"):
        score_task(task, path, root=work)
