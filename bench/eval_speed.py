#!/usr/bin/env python3
"""Evaluation-speed benchmark: one model, the same CosmosQA rows, three ways of scoring them.

* ``starter-kit``: our transcription of the NeurIPS 2024 LLM Merging Competition starter kit's
  decoder evaluation (bench/starter_kit_loop.py): one example at a time, the prompt cached and the
  cache repeated per choice, the first token of each choice unscored and an EOS appended. It runs
  in this process on a model loaded with ``AutoModelForCausalLM.from_pretrained`` in ``--dtype``,
  with torch's default thread count.
* ``lm-eval``: lm-evaluation-harness 0.4.13's ``hf`` backend, ``HFLM.loglikelihood`` with
  ``--batch-size`` (bench/lmeval_runner.py, run by bench/.venv-lmeval/bin/python as a
  subprocess). Each choice is a continuation; its score is the summed log-probability of all its
  tokens.
* ``mergearena``: mergearena's own evaluation, once per ``--mc-rule`` (``run_mergearena``), with
  ``--batch-size auto`` the limits ``mergearena eval`` uses on the device (examples and padded
  tokens per batch, ``scoring.auto_limits``).

Only the scoring is timed: model loading is reported apart. On a GPU each tool first scores two
rows untimed (CUDA's start-up), but a tool's first full pass still loads kernels and grows the
memory pool (mergearena took 6.1 s, then 3.5 s, on the 8B run below): give ``--repeat 2``.
Predictions are compared between tools that apply the same rule (starter-kit vs
mergearena/starter-kit, lm-eval vs mergearena/loglik) and across rules (starter-kit vs lm-eval) for
information. In bfloat16, batching alone moves scores by about 0.1 (the kit's own rows batched
differently would too), so rows whose best two choices are that close can flip.

    bash bench/setup_eval.sh                     # once: lm-eval venv + SmolLM2-135M checkpoint
    .venv/bin/python bench/eval_speed.py         # 40 rows, all tools
    .venv/bin/python bench/eval_speed.py --rows 100 --repeat 3 --tools starter-kit,lm-eval

Random weights (``--random-init``), for machines the real weights cannot reach: a model of
``--model``'s config, or of a known ``--shape`` (``llama-3-8b``: Llama-3-8B's layers, the vocabulary
of ``--model``'s tokenizer), seeded, built in memory on ``--device`` in ``--dtype`` and shared by
the starter kit and mergearena. ``--model`` then needs only the tokenizer files (and config.json
without ``--shape``). ``--random-init DIR`` also saves it there (or loads it from there) for
lm-eval, which runs in another process. The 8B comparison on one GPU (TOKENIZER_DIR: SmolLM2's
tokenizer.json and tokenizer_config.json; DATA: cosmos_qa.csv, as ../shared stays behind):

    PYTHONPATH=src python3 bench/eval_speed.py --model TOKENIZER_DIR --data DATA --random-init \
        --shape llama-3-8b --device cuda --dtype bfloat16 --rows 500 --repeat 2 \
        --tools starter-kit,mergearena

Rows. ``--rows N`` takes the first N rows of the competition's cosmos_qa.csv. Its rows come in four
prompt templates: half have the option texts as answer choices, half have letters ("A".."D") with
the options written in the prompt as "A. text" lines. By default (full-text choices) the letter
choices are replaced by the texts parsed from the prompt, so that every tool scores option texts;
``--letter-choices`` keeps the CSV's choices as they are.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_MODEL = BENCH_DIR / "_work" / "smollm2-135m"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "competition" / "cosmos_qa.csv"
DEFAULT_LMEVAL_PYTHON = BENCH_DIR / ".venv-lmeval" / "bin" / "python"
LMEVAL_RUNNER = BENCH_DIR / "lmeval_runner.py"

ALL_TOOLS = ("starter-kit", "lm-eval", "mergearena")
MC_RULES = ("starter-kit", "loglik")
# Which tool applies which multiple-choice rule, for the agreement check.
TOOL_RULE = {"starter-kit": "starter-kit", "lm-eval": "loglik"}


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------

LETTERED = re.compile(r"^\s*([A-Z])\.\s(.*)$")
DASHED = re.compile(r"^\s*-\s(.*)$")


def parse_options(text: str) -> list[tuple[str | None, str]]:
    """The options written at the end of a prompt, as (letter or None, text) in order.

    Two layouts occur: "A. text" lines (after "Options:", after "Pick the best answer from the
    following options:", or straight after the question), and "- text" lines after "Options:".
    The options are the prompt's last lines; parsing walks back from the end while lines match one
    layout. Returns [] when the prompt does not end with options.
    """
    lines = text.rstrip("\n").split("\n")
    found: list[tuple[str | None, str]] = []
    layout = None
    for line in reversed(lines):
        m = LETTERED.match(line)
        if m and layout in (None, "lettered"):
            layout = "lettered"
            found.append((m.group(1), m.group(2).strip()))
            continue
        m = DASHED.match(line)
        if m and layout in (None, "dashed"):
            layout = "dashed"
            found.append((None, m.group(1).strip()))
            continue
        break
    found.reverse()
    if layout == "lettered":
        letters = [letter for letter, _ in found]
        # Keep the run that reads A, B, C, ... up to the end (a stray "X. " line above is not ours).
        start = len(letters) - 1
        while start > 0 and ord(letters[start - 1]) == ord(letters[start]) - 1:
            start -= 1
        found = found[start:]
        if found and found[0][0] != "A":
            return []
    return found


def _is_letters(choices: list[str]) -> bool:
    return all(re.fullmatch(r"[A-Z]", c) for c in choices)


def load_cosmos_rows(
    path: str | os.PathLike = DEFAULT_DATA, n: int | None = None, full_text_choices: bool = True
) -> list[dict]:
    """The first ``n`` rows (all when None) of the competition's cosmos_qa.csv.

    Each row: {"id", "input", "target" (the CSV's index string, unchanged), "answer_choices": list,
    "eval_type"}. With ``full_text_choices``, letter choices (["A", "B", "C", "D"]) are replaced by
    the option texts parsed from the prompt, in the same order, so the target index still holds;
    a row whose options do not parse to exactly its letters raises ValueError.
    """
    rows = []
    with open(path, newline="") as fh:
        for record in csv.DictReader(fh):
            if n is not None and len(rows) >= n:
                break
            choices = record["answer_choices"]
            if isinstance(choices, str) and choices.startswith("["):
                choices = ast.literal_eval(choices)
            row = {
                "id": record["id"],
                "input": record["input"],
                "target": record.get("target"),
                "answer_choices": list(choices),
                "eval_type": record.get("eval_type") or "multiple_choice",
            }
            if full_text_choices and _is_letters(row["answer_choices"]):
                options = parse_options(row["input"])
                letters = [letter for letter, _ in options]
                if letters != row["answer_choices"]:
                    raise ValueError(
                        f"row {row['id']}: choices {row['answer_choices']} but the prompt's "
                        f"options parse to {letters or 'nothing'}"
                    )
                row["answer_choices"] = [option for _, option in options]
            rows.append(row)
    return rows


def check_cosmos_rows(path: str | os.PathLike = DEFAULT_DATA) -> dict:
    """Parse every row's options; count the layouts and list the rows that fail.

    A letter-choice row must parse to exactly its letters. A full-text row whose prompt also lists
    its options ("- text" lines) must list the same texts in the same order.
    """
    report = {
        "rows": 0,
        "letter_rows": 0,
        "text_rows": 0,
        "text_rows_with_options": 0,
        "failures": [],
    }
    with open(path, newline="") as fh:
        for record in csv.DictReader(fh):
            report["rows"] += 1
            choices = ast.literal_eval(record["answer_choices"])
            options = parse_options(record["input"])
            if _is_letters(choices):
                report["letter_rows"] += 1
                if [letter for letter, _ in options] != choices or any(not t for _, t in options):
                    report["failures"].append((record["id"], choices, options))
            else:
                report["text_rows"] += 1
                if options:
                    report["text_rows_with_options"] += 1
                    if [t for _, t in options] != [c.strip() for c in choices]:
                        report["failures"].append((record["id"], choices, options))
    return report


# --------------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------------


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# Known model shapes for --random-init --shape: config fields over a Llama config whose
# vocabulary is the tokenizer's.
SHAPES = {
    "llama-3-8b": {  # Meta-Llama-3-8B's config.json
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}


def random_config(model_dir: Path, shape: str | None):
    """``model_dir``'s config, or a Llama config of ``shape`` over its tokenizer's vocabulary."""
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig

    if shape is None:
        return AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **SHAPES[shape],
    )


def random_model(
    model_dir: Path, *, shape: str | None, dtype: str, device: str, out: Path | None, seed: int = 0
):
    """A model with seeded random weights, on ``device`` in ``dtype``; timings need only shapes.

    Built where it runs (an 8B model takes seconds on a GPU, and no disk). With ``out``: loaded
    from there if it holds a checkpoint, else saved there with ``model_dir``'s tokenizer.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if out is not None and (out / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(out, dtype=_torch_dtype(dtype))
        return model.to(device).eval()
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            random_config(model_dir, shape), dtype=_torch_dtype(dtype)
        )
    if out is not None:
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return model.eval()


def _parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run_starter_kit(
    model_dir: Path,
    rows: list[dict],
    dtype: str,
    repeat: int,
    device: str = "cpu",
    model=None,
) -> dict:
    """The starter kit's loop, in this process, on ``model`` if given (else loaded from
    ``model_dir``, whose tokenizer it uses either way). Scores are those of the last repeat."""
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(BENCH_DIR))
    from starter_kit_loop import starter_kit_eval

    t0 = time.perf_counter()
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_torch_dtype(dtype))
        model = model.to(device).eval()
    load_seconds = time.perf_counter() - t0
    if device.startswith("cuda"):
        starter_kit_eval(model, str(model_dir), rows[:2])  # CUDA's start-up, untimed
    times, cpu_times, results = [], [], None
    for _ in range(repeat):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        results = starter_kit_eval(model, str(model_dir), rows)
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return {
        "seconds": min(times),
        "cpu_seconds": min(cpu_times),
        "all_seconds": times,
        "load_seconds": load_seconds,
        "threads": torch.get_num_threads(),
        "scores": [r["scores"] for r in results],
        "predictions": [r["prediction"] for r in results],
    }


def run_lm_eval(
    model_dir: Path,
    rows: list[dict],
    dtype: str,
    batch_size: int,
    repeat: int,
    python: Path,
    continuation_prefix: str = "",
) -> dict:
    """lm-eval in its own venv, one subprocess per repeat; each loads the model anew."""
    if not Path(python).exists():
        raise FileNotFoundError(f"{python} not found: run `bash bench/setup_eval.sh` first")
    with tempfile.TemporaryDirectory(prefix="eval_speed-") as tmp:
        rows_path = Path(tmp) / "rows.json"
        rows_path.write_text(
            json.dumps(
                [
                    {
                        "id": r["id"],
                        "input": r["input"],
                        "choices": [continuation_prefix + c for c in r["answer_choices"]],
                    }
                    for r in rows
                ]
            )
        )
        runs = []
        for i in range(repeat):
            out = Path(tmp) / f"result-{i}.json"
            cmd = [
                str(python),
                str(LMEVAL_RUNNER),
                "--model",
                str(model_dir),
                "--rows",
                str(rows_path),
                "--batch-size",
                str(batch_size),
                "--dtype",
                dtype,
                "--out",
                str(out),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"lm-eval runner failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
                )
            runs.append(json.loads(out.read_text()))
    times = [r["seconds"] for r in runs]
    return {
        "seconds": min(times),
        "all_seconds": times,
        "load_seconds": min(r["load_seconds"] for r in runs),
        "threads": runs[-1]["torch_threads"],
        "scores": runs[-1]["scores"],
        "predictions": runs[-1]["predictions"],
    }


def _transcription_appends_eos(tokenizer) -> bool:
    """Whether the starter kit's target tokenizer (a copy with add_eos_token=True) appends EOS
    under the installed transformers: 5.x honours the attribute for every tokenizer class,
    the 4.4x releases of the competition only for Llama-family ones."""
    import copy

    target = copy.deepcopy(tokenizer)
    target.add_bos_token = False
    target.add_eos_token = True
    ids = target("word", add_special_tokens=True)["input_ids"]
    return tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id]


def run_mergearena(
    model_dir: Path,
    rows: list[dict],
    mc_rule: str,
    batch_size: int | str,
    dtype: str,
    device: str = "cpu",
    repeat: int = 1,
    model=None,
    token_budget: int | None = None,
) -> dict:
    """mergearena's scorer on the same rows (encoding included in the time, as for the others),
    on ``model`` if given (else loaded from ``model_dir``, whose tokenizer it uses either way).

    ``batch_size`` "auto" takes ``scoring.auto_limits`` for the device, as ``mergearena eval``
    does; ``token_budget`` overrides its token budget (a number batch size has none unless
    given). For ``starter-kit`` the EOS decision follows the transcription's tokenizer under the
    installed transformers (see ``_transcription_appends_eos``), so both apply the very same rule.
    """
    import torch

    sys.path.insert(0, str(REPO_ROOT / "src"))
    from transformers import AutoTokenizer

    from mergearena.evaluation import encode_choices, encode_prompts, score_choices
    from mergearena.evaluation.scoring import auto_limits
    from mergearena.models import LanguageModel

    t0 = time.perf_counter()
    if model is None:
        lm = LanguageModel.load(model_dir, device=device, dtype=dtype)
    else:
        lm = LanguageModel(model, AutoTokenizer.from_pretrained(model_dir), name="random")
    if mc_rule == "starter-kit":
        lm.eos_rule = _transcription_appends_eos(lm.tokenizer)
    load_seconds = time.perf_counter() - t0
    if batch_size == "auto":
        size, budget = auto_limits(lm.device)
    else:
        size, budget = int(batch_size), None
    budget = token_budget or budget

    def score(some_rows: list[dict]):
        prompts = encode_prompts(lm, [r["input"] for r in some_rows])
        choices = encode_choices(lm, [r["answer_choices"] for r in some_rows], mc_rule)
        return score_choices(
            lm, prompts, choices, rule=mc_rule, batch_size=size, token_budget=budget
        )

    if device.startswith("cuda"):
        score(rows[:2])  # CUDA's start-up, untimed
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times, results = [], [], None
    for _ in range(repeat):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        results = score(rows)
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return {
        "seconds": min(times),
        "cpu_seconds": min(cpu_times),
        "all_seconds": times,
        "load_seconds": load_seconds,
        "threads": torch.get_num_threads(),
        "batch_size": size,
        "token_budget": budget,
        "peak_gib": (
            torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
        ),
        "eos_appended": lm.starter_kit_appends_eos if mc_rule == "starter-kit" else None,
        "scores": [list(r.scores) for r in results],
        "predictions": [r.prediction for r in results],
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def agreement(a: dict, b: dict) -> dict:
    pa, pb = a["predictions"], b["predictions"]
    same = sum(x == y for x, y in zip(pa, pb, strict=True))
    diffs = [
        abs(x - y)
        for sa, sb in zip(a["scores"], b["scores"], strict=True)
        for x, y in zip(sa, sb, strict=True)
    ]
    return {
        "same": same,
        "of": len(pa),
        "identical": same == len(pa),
        "max_score_diff": max(diffs) if diffs else None,
    }


def accuracy(result: dict, rows: list[dict]) -> float | None:
    try:
        gold = [int(r["target"]) for r in rows]
    except (TypeError, ValueError):
        return None
    return sum(p == g for p, g in zip(result["predictions"], gold, strict=True)) / len(gold)


def print_table(results: dict, rows: list[dict], agreements: list[dict]) -> None:
    n = len(rows)
    base = results.get("starter-kit")
    header = (
        f"{'tool':<24} {'rule':<12} {'scoring s':>10} {'cpu s':>8} {'load s':>8} {'ex/s':>8} "
        f"{'vs kit':>8} {'acc':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, res in results.items():
        if "error" in res:
            print(f"{name:<24} {res.get('rule', ''):<12} {res['error']}")
            continue
        ratio = f"{base['seconds'] / res['seconds']:.2f}x" if base and "seconds" in base else "-"
        cpu = "-" if res.get("cpu_seconds") is None else f"{res['cpu_seconds']:.2f}"
        acc = accuracy(res, rows)
        acc_text = "-" if acc is None else f"{acc:.3f}"
        print(
            f"{name:<24} {res.get('rule', ''):<12} {res['seconds']:>10.2f} {cpu:>8} "
            f"{res['load_seconds']:>8.2f} {n / res['seconds']:>8.2f} {ratio:>8} {acc_text:>6}"
        )
    print(
        "('vs kit' = starter-kit time / this tool's time: above 1 is faster than the kit; "
        "cpu s = this process's CPU time for that run)"
    )
    for name, res in results.items():
        if res.get("batch_size") is not None:
            peak = res.get("peak_gib")
            print(
                f"{name}: at most {res['batch_size']} examples and "
                f"{res['token_budget'] or 'any number of'} tokens a batch"
                + ("" if peak is None else f", peak GPU memory {peak:.1f} GiB")
            )
    if agreements:
        print()
        for ag in agreements:
            mark = "identical" if ag["identical"] else "DIFFER"
            note = "" if ag["same_rule"] else "  (different rules: agreement not expected)"
            diff = "-" if ag["max_score_diff"] is None else f"{ag['max_score_diff']:.2e}"
            print(
                f"predictions {ag['a']} vs {ag['b']}: {ag['same']}/{ag['of']} same, {mark}; "
                f"max |score diff| {diff}{note}"
            )


IN_MEMORY = Path()  # --random-init without a DIR


def _batch_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: a positive integer or auto")
    return size


def _csv_list(value: str, allowed) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
    return items


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF checkpoint directory")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="cosmos_qa.csv")
    ap.add_argument("--rows", type=int, default=40, help="first N rows (default 40)")
    ap.add_argument(
        "--repeat", type=int, default=1, help="runs per tool; the best time is reported"
    )
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument(
        "--tools",
        default=",".join(ALL_TOOLS),
        type=lambda v: _csv_list(v, ALL_TOOLS),
        help="comma list of " + ",".join(ALL_TOOLS),
    )
    ap.add_argument(
        "--batch-size",
        type=_batch_size,
        default="auto",
        help="mergearena's examples per batch, or auto (default: its limits for the device, "
        "examples and tokens); lm-eval's batch size (8 under auto)",
    )
    ap.add_argument(
        "--token-budget",
        type=int,
        help="mergearena's padded tokens per forward pass (default: auto's for the device, "
        "none with a number --batch-size)",
    )
    ap.add_argument(
        "--mc-rule",
        default=",".join(MC_RULES),
        type=lambda v: _csv_list(v, MC_RULES),
        help="mergearena's rule(s), comma list (default: both)",
    )
    ap.add_argument(
        "--letter-choices",
        action="store_true",
        help="keep the CSV's letter choices instead of the option texts",
    )
    ap.add_argument("--lm-eval-python", type=Path, default=DEFAULT_LMEVAL_PYTHON)
    ap.add_argument(
        "--lm-eval-prefix",
        default="",
        help="string put before each choice for lm-eval only (lm-eval tasks use ' ')",
    )
    ap.add_argument(
        "--check-rows",
        action="store_true",
        help="only check that every CSV row's options parse, and exit",
    )
    ap.add_argument(
        "--bf16-agreement",
        action="store_true",
        help="also run mergearena/loglik in bfloat16 and report its agreement with float32",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda (starter kit and mergearena)")
    ap.add_argument(
        "--random-init",
        nargs="?",
        const=IN_MEMORY,
        type=Path,
        metavar="DIR",
        help="time a model with seeded random weights of --model's config (or --shape), built "
        "on --device in --dtype and shared by starter-kit and mergearena (--model then needs "
        "only config.json and the tokenizer files); with DIR also saved there, or loaded from "
        "there if present, for lm-eval",
    )
    ap.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        help="with --random-init: this shape over --model's tokenizer (no config.json needed)",
    )
    ap.add_argument("--json", type=Path, help="write all results here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check_rows:
        report = check_cosmos_rows(args.data)
        print(json.dumps({k: v for k, v in report.items() if k != "failures"}))
        for failure in report["failures"]:
            print("FAIL", failure)
        return 1 if report["failures"] else 0

    rows = load_cosmos_rows(args.data, args.rows, full_text_choices=not args.letter_choices)
    if args.shape and args.random_init is None:
        raise SystemExit("--shape needs --random-init: it describes random weights")
    model, lm_eval_model = None, args.model
    if args.random_init is not None:
        if "lm-eval" in args.tools and args.random_init == IN_MEMORY:
            raise SystemExit("lm-eval runs in another process: give --random-init DIR to share")
        out = None if args.random_init == IN_MEMORY else args.random_init
        t0 = time.perf_counter()
        model = random_model(
            args.model, shape=args.shape, dtype=args.dtype, device=args.device, out=out
        )
        lm_eval_model = out
        print(
            f"random weights, {args.shape or 'the config of ' + str(args.model)}: "
            f"{_parameters(model) / 1e9:.2f}B parameters, built in "
            f"{time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    print(
        f"{len(rows)} rows of {args.data.name}, {'letter' if args.letter_choices else 'full-text'} "
        f"choices, model {args.model}, {args.dtype}, {args.device}, repeat {args.repeat}",
        flush=True,
    )
    lm_eval_batch = 8 if args.batch_size == "auto" else args.batch_size

    results: dict[str, dict] = {}
    for tool in args.tools:
        if tool == "starter-kit":
            print("running starter-kit ...", flush=True)
            results["starter-kit"] = {
                "rule": "starter-kit",
                **run_starter_kit(
                    args.model, rows, args.dtype, args.repeat, args.device, model=model
                ),
            }
        elif tool == "lm-eval":
            print(f"running lm-eval (batch {lm_eval_batch}) ...", flush=True)
            results["lm-eval"] = {
                "rule": "loglik",
                **run_lm_eval(
                    lm_eval_model,
                    rows,
                    args.dtype,
                    lm_eval_batch,
                    args.repeat,
                    args.lm_eval_python,
                    args.lm_eval_prefix,
                ),
            }
        else:
            for rule in args.mc_rule:
                name = f"mergearena/{rule}"
                print(f"running {name} (batch {args.batch_size}) ...", flush=True)
                results[name] = {
                    "rule": rule,
                    **run_mergearena(
                        args.model,
                        rows,
                        rule,
                        args.batch_size,
                        args.dtype,
                        device=args.device,
                        repeat=args.repeat,
                        model=model,
                        token_budget=args.token_budget,
                    ),
                }
            if args.bf16_agreement and args.dtype != "bfloat16":
                # Its own "rule" label: the agreement with float32 is reported, not required.
                name = "mergearena/loglik-bf16"
                print(f"running {name} (batch {args.batch_size}) ...", flush=True)
                results[name] = {
                    "rule": "loglik (bfloat16)",
                    **run_mergearena(
                        args.model,
                        rows,
                        "loglik",
                        args.batch_size,
                        "bfloat16",
                        device=args.device,
                        repeat=args.repeat,
                        # The last use of the random weights: converted in place.
                        model=None if model is None else model.to(dtype=_torch_dtype("bfloat16")),
                        token_budget=args.token_budget,
                    ),
                }

    ok = [name for name, res in results.items() if "error" not in res]
    agreements = []
    for i, a in enumerate(ok):
        for b in ok[i + 1 :]:
            same_rule = results[a]["rule"] == results[b]["rule"]
            agreements.append(
                {"a": a, "b": b, "same_rule": same_rule, **agreement(results[a], results[b])}
            )

    print()
    print_table(results, rows, agreements)
    if args.json:
        doc = {
            "rows": len(rows),
            "data": str(args.data),
            "model": str(args.model),
            "dtype": args.dtype,
            "full_text_choices": not args.letter_choices,
            "repeat": args.repeat,
            "batch_size": args.batch_size,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "ids": [r["id"] for r in rows],
            "results": results,
            "agreements": agreements,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))
    # Disagreement between tools applying the same rule is a failure of the benchmark's check.
    return 1 if any(ag["same_rule"] and not ag["identical"] for ag in agreements) else 0


if __name__ == "__main__":
    sys.exit(main())
