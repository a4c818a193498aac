"""Score multiple-choice rows with lm-evaluation-harness's `hf` backend (HFLM.loglikelihood).

Run with the lm-eval venv made by bench/setup_eval.sh:

    bench/.venv-lmeval/bin/python bench/lmeval_runner.py --model DIR --rows ROWS.json \
        --batch-size 8 --out RESULT.json

ROWS.json is a list of {"id", "input", "choices": [str, ...]}. Each (row, choice) pair becomes one
"loglikelihood" request with context = the row's input and continuation = the choice text exactly
as given. lm-eval's own tasks usually put a leading space in the continuation (" answer"); here the
strings are the ones every tool in bench/eval_speed.py gets, unchanged, so that all tools score the
same text. lm-eval returns, per request, (summed log-probability of all continuation tokens,
is_greedy); the score is the first element, and the prediction is the argmax over a row's choices
(the first one on ties).

RESULT.json: {"seconds": time of the loglikelihood call alone, "load_seconds": time to build HFLM
(model and tokenizer load), "scores": [[float per choice] per row], "predictions": [int per row],
plus the settings used}.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    ap.add_argument("--rows", required=True, help='JSON list of {"id", "input", "choices"}')
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    with open(args.rows) as f:
        rows = json.load(f)

    # Imported here so that --help works without the heavy imports, and so that their time is
    # counted in neither figure.
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    t0 = time.perf_counter()
    lm = HFLM(
        pretrained=args.model, batch_size=args.batch_size, device=args.device, dtype=args.dtype
    )
    load_seconds = time.perf_counter() - t0

    requests = []
    for row_idx, row in enumerate(rows):
        for choice_idx, choice in enumerate(row["choices"]):
            requests.append(
                Instance(
                    request_type="loglikelihood",
                    doc=row,
                    arguments=(row["input"], choice),
                    idx=choice_idx,
                    metadata=("eval_speed", row_idx, 1),
                )
            )

    t0 = time.perf_counter()
    results = lm.loglikelihood(requests, disable_tqdm=True)
    seconds = time.perf_counter() - t0

    scores, predictions = [], []
    it = iter(results)
    for row in rows:
        row_scores = [float(next(it)[0]) for _ in row["choices"]]
        scores.append(row_scores)
        predictions.append(max(range(len(row_scores)), key=row_scores.__getitem__))

    out = {
        "tool": "lm-eval",
        "lm_eval_version": version("lm_eval"),
        "transformers_version": version("transformers"),
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "rows": len(rows),
        "requests": len(requests),
        "seconds": seconds,
        "load_seconds": load_seconds,
        "ids": [row["id"] for row in rows],
        "scores": scores,
        "predictions": predictions,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(
        f"lm-eval: {len(rows)} rows, {len(requests)} requests, {seconds:.2f} s "
        f"(load {load_seconds:.2f} s) -> {args.out}"
    )


if __name__ == "__main__":
    main()
