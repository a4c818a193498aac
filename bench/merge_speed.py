#!/usr/bin/env python3
"""Merge-speed benchmark: mergearena against mergekit on random Llama-shaped checkpoints.

Builds three random bf16 checkpoints of about ``--params`` parameters each (a base model and two
"fine-tunes" = base + small noise), sharded and indexed like ``save_pretrained`` writes them, with
a LlamaForCausalLM config.json. They are cached under ``bench/_work/ckpt-*`` keyed by their shape,
so reruns skip the generation. Each method is then merged by each tool, run as a subprocess; the
wall time and the peak RSS of that child (``ru_maxrss`` from ``os.wait4``) are recorded. For the
deterministic methods (linear, ties) the two outputs are compared tensor by tensor.

Run it with any Python that has torch and safetensors (the project venv does):

    .venv/bin/python bench/merge_speed.py                     # default: ~0.8B, all methods
    .venv/bin/python bench/merge_speed.py --params 0.1e9      # quick run
    .venv/bin/python bench/merge_speed.py --methods ties --tools mergearena --threads 2

mergekit comes from bench/.venv-mergekit (``bash bench/setup_mergekit.sh``); mergearena from the
project venv (.venv/bin/mergearena), or wherever --mergearena-bin points. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_WORK = BENCH_DIR / "_work"
DEFAULT_MERGEKIT = BENCH_DIR / ".venv-mergekit" / "bin" / "mergekit-yaml"
DEFAULT_MERGEARENA = REPO_ROOT / ".venv" / "bin" / "mergearena"

ALL_METHODS = ("linear", "ties", "dare_ties")
DETERMINISTIC = {"linear", "ties"}
# bench/README.md's targets: speedup mergekit/mergearena per method, and peak RSS at most half.
TARGET_SPEEDUP = {"linear": 1.0, "ties": 8.0, "dare_ties": 5.0}
TARGET_RSS_RATIO = 2.0
ALL_TOOLS = ("mergekit", "mergearena")

# Bump when the generated checkpoints change, so old caches are not reused.
GENERATOR_VERSION = 1
VOCAB = 32000
HEAD_DIM = 64


# --------------------------------------------------------------------------------------------
# Checkpoint generation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = VOCAB
    head_dim: int = HEAD_DIM

    @staticmethod
    def llama3_8b() -> Shape:
        """Meta-Llama-3-8B's tensors: 8.03B parameters, 16 GB in bf16."""
        return Shape(4096, 14336, 32, 32, 8, vocab=128256, head_dim=128)

    @staticmethod
    def for_params(target: float) -> Shape:
        """A Llama shape (GQA, untied embeddings, vocab 32000) of about ``target`` parameters.

        The hidden size is the largest whose two embedding matrices take at most ~20% of the
        parameters while leaving at least 12 layers (TinyLlama's proportions: 0.8B -> hidden 2048,
        intermediate 5632, 15 layers; 7B -> hidden 4096, intermediate 11264, 33 layers).
        """

        def build(hidden: int) -> Shape:
            heads = hidden // HEAD_DIM
            kv_heads = max(1, heads // 8)
            intermediate = int(round(hidden * 2.75 / 256)) * 256
            probe = Shape(hidden, intermediate, 1, heads, kv_heads)
            layers = max(1, round((target - probe.embedding_params()) / probe.layer_params()))
            return Shape(hidden, intermediate, layers, heads, kv_heads)

        best = build(512)
        for h in (768, 1024, 1536, 2048, 2560, 3072, 4096, 5120, 8192):
            cand = build(h)
            if 2 * VOCAB * h <= 0.2 * target and cand.layers >= 12:
                best = cand
        return best

    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return 2 * h * h + 2 * h * kv + 3 * h * self.intermediate + 2 * h

    def embedding_params(self) -> int:
        return 2 * self.vocab * self.hidden + self.hidden  # embed_tokens, lm_head, final norm

    def total_params(self) -> int:
        return self.embedding_params() + self.layers * self.layer_params()

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, kv, ff = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (ff, h)),
                (p + "mlp.up_proj.weight", (ff, h)),
                (p + "mlp.down_proj.weight", (h, ff)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": 2048,
            "mlp_bias": False,
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "dtype": "bfloat16",  # what transformers 5 writes (4.x wrote torch_dtype)
            "use_cache": True,
            "vocab_size": self.vocab,
        }


MODEL_NAMES = ("base", "ft1", "ft2")


def _complete(model_dir: Path) -> bool:
    return (model_dir / ".complete").exists()


def ensure_checkpoints(
    work: Path, shape: Shape, shard_bytes: int, noise: float, seed: int, device: str = "cpu"
) -> dict:
    """Generate (or reuse) base, ft1, ft2 under ``work/ckpt-<key>``; returns name -> path.

    ``device`` draws the random numbers there (``cuda`` builds an 8B trio in seconds; its random
    stream differs from the CPU's, so the key names it)."""
    key = (
        f"ckpt-{shape.total_params() / 1e9:.2f}B-h{shape.hidden}-l{shape.layers}"
        f"-s{shard_bytes >> 20}M-n{noise:g}-seed{seed}-v{GENERATOR_VERSION}"
    )
    if (shape.vocab, shape.head_dim, device) != (VOCAB, HEAD_DIM, "cpu"):
        key += f"-vocab{shape.vocab}-hd{shape.head_dim}-{device}"
    root = work / key
    paths = {name: root / name for name in MODEL_NAMES}
    if all(_complete(p) for p in paths.values()):
        print(f"using cached checkpoints in {root}")
        return paths

    import torch
    from safetensors.torch import save_file

    print(f"generating 3 checkpoints of {shape.total_params() / 1e9:.3f}B params in {root} ...")
    t0 = time.perf_counter()
    for p in paths.values():
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True)

    # Shard like transformers' save_pretrained: tensors in state-dict order, a new shard when the
    # next tensor would exceed the size limit.
    specs = shape.tensors()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in specs:
        nbytes = 2 * math.prod(shp)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += nbytes
    n = len(shards)
    gen = torch.Generator(device).manual_seed(seed)
    total_size = 2 * shape.total_params()
    weight_maps: dict[str, dict[str, str]] = {m: {} for m in MODEL_NAMES}
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors"
        data: dict[str, dict[str, torch.Tensor]] = {m: {} for m in MODEL_NAMES}
        for name, shp in shard:
            if name.endswith("norm.weight"):
                base = torch.ones(shp, dtype=torch.float32, device=device)
            else:
                base = torch.randn(shp, generator=gen, dtype=torch.float32, device=device)
                base.mul_(0.02)
            data["base"][name] = base.to(torch.bfloat16).cpu()
            for m in ("ft1", "ft2"):
                delta = torch.randn(shp, generator=gen, dtype=torch.float32, device=device)
                data[m][name] = delta.mul_(noise).add_(base).to(torch.bfloat16).cpu()
                del delta
            del base
        for m in MODEL_NAMES:
            save_file(data[m], str(paths[m] / fname), metadata={"format": "pt"})
            for name, _ in shard:
                weight_maps[m][name] = fname
        del data
        print(f"  shard {k}/{n} written ({time.perf_counter() - t0:.0f} s)")
    for m in MODEL_NAMES:
        (paths[m] / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
        if n > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": weight_maps[m]}
            (paths[m] / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (paths[m] / ".complete").write_text("")
    print(f"checkpoints ready in {time.perf_counter() - t0:.0f} s")
    return paths


# --------------------------------------------------------------------------------------------
# Recipes and runs
# --------------------------------------------------------------------------------------------


def recipe_yaml(method: str, paths: dict, density: float) -> str:
    """A mergekit-format recipe; both tools read the same file."""
    lines = ["models:"]
    for m in ("ft1", "ft2"):
        lines.append(f"  - model: {paths[m]}")
        if method == "linear":
            lines.append("    parameters: {weight: 0.5}")
        else:
            lines.append(f"    parameters: {{weight: 0.5, density: {density:g}}}")
    if method != "linear":
        lines.append(f"base_model: {paths['base']}")
    lines += [f"merge_method: {method}", "dtype: bfloat16", ""]
    return "\n".join(lines)


@dataclass
class Run:
    tool: str
    method: str
    repeat: int
    wall_s: float
    peak_rss_mb: float
    returncode: int
    cpu_s: float  # user + system CPU seconds of the child
    other_cpu_s: float | None  # CPU seconds the rest of the machine used meanwhile
    command: str
    log: str


@dataclass
class Comparison:
    method: str
    tensors: int = 0
    max_abs_diff: float | None = None
    frac_elements_differing: float | None = None
    delta_norm_ratio: float | None = None  # ||mergearena - base|| / ||mergekit - base||
    # One tensor merged here in float32 (exact task vectors, stable tie-breaking at the trim
    # threshold): max |output - reference| per tool.
    reference_tensor: str | None = None
    reference_max_abs_diff: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _busy_cpu_s() -> float | None:
    """Machine-wide busy CPU seconds so far (from /proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = f[3] + (f[4] if len(f) > 4 else 0)  # idle + iowait
    return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# Runs one command and reports its rusage. It runs in a fresh, small interpreter that forks the
# command, because ru_maxrss is inherited through exec: Python's subprocess uses vfork, so a child
# started directly from this (large, after loading tensors) process would report at least this
# process's own peak RSS. Forked from the ~10 MB launcher, the command's peak is its own.
_LAUNCHER = """
import json, os, sys, time
result, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    except OSError as error:
        os.write(2, f"cannot run {cmd[0]}: {error}\\n".encode())
    os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(result, "w") as fh:
    json.dump({"wall": wall, "maxrss_kib": usage.ru_maxrss, "utime": usage.ru_utime,
               "stime": usage.ru_stime, "returncode": os.waitstatus_to_exitcode(status)}, fh)
"""


def run_tool(
    cmd: list[str], log_path: Path, env: dict
) -> tuple[float, float, int, float, float | None]:
    """Run ``cmd`` as a child; return (wall seconds, peak RSS in MiB of that child, returncode,
    the child's CPU seconds, CPU seconds used by other processes meanwhile).

    The rusage is ``os.wait4``'s for that one process (and any descendants it reaped), taken by
    a small launcher process (see ``_LAUNCHER``), so neither this process's memory nor earlier
    children's count.
    """
    result = log_path.with_suffix(".rusage.json")
    result.unlink(missing_ok=True)
    launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(result), *cmd]
    with open(log_path, "wb") as log:
        busy0 = _busy_cpu_s()
        launched = subprocess.run(launcher, stdout=log, stderr=subprocess.STDOUT, env=env)
        busy1 = _busy_cpu_s()
    if not result.exists():
        raise RuntimeError(f"the launcher failed (exit {launched.returncode}); see {log_path}")
    r = json.loads(result.read_text())
    cpu = r["utime"] + r["stime"]
    other = None if busy0 is None or busy1 is None else max(0.0, busy1 - busy0 - cpu)
    return r["wall"], r["maxrss_kib"] / 1024.0, r["returncode"], cpu, other


def tool_command(tool: str, args, recipe: Path, out: Path) -> list[str]:
    if tool == "mergekit":
        # mergekit at its CPU defaults; only skip the tokenizer copy (the random checkpoints have
        # none) and the progress bars.
        cmd = [str(args.mergekit_bin), str(recipe), str(out), "--no-copy-tokenizer", "--quiet"]
        if args.threads:
            cmd += ["--num-threads", str(args.threads)]
        return cmd + shlex.split(args.mergekit_args)
    cmd = [str(args.mergearena_bin), "merge", str(recipe), "--out", str(out), "--quiet"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd + shlex.split(args.mergearena_args)


def warm_page_cache(paths: dict) -> None:
    """Read the inputs once, so every run starts with them in the page cache."""
    for p in paths.values():
        for f in sorted(p.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass


# --------------------------------------------------------------------------------------------
# Output comparison
# --------------------------------------------------------------------------------------------


def _tensor_files(out: Path) -> dict[str, Path]:
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                where[k] = f
    return where


def compare_outputs(
    method: str, ours: Path, theirs: Path, base: Path, deterministic: bool
) -> Comparison:
    """Compare two merged checkpoints one tensor at a time (never two whole models in memory)."""
    import torch
    from safetensors import safe_open

    cmp = Comparison(method=method)
    a_files, b_files, base_files = _tensor_files(ours), _tensor_files(theirs), _tensor_files(base)
    if not a_files:
        cmp.problems.append("mergearena output has no safetensors files")
        return cmp
    if set(a_files) != set(b_files):
        only_a, only_b = sorted(set(a_files) - set(b_files)), sorted(set(b_files) - set(a_files))
        cmp.problems.append(
            f"tensor sets differ: only mergearena {only_a[:5]}, only mergekit {only_b[:5]}"
        )
    if not (ours / "config.json").exists():
        cmp.problems.append("mergearena output has no config.json")
    max_diff, n_diff, n_total = 0.0, 0, 0
    da2, db2 = 0.0, 0.0
    for name in sorted(set(a_files) & set(b_files)):
        with safe_open(str(a_files[name]), framework="pt") as fa:
            a = fa.get_tensor(name)
        with safe_open(str(b_files[name]), framework="pt") as fb:
            b = fb.get_tensor(name)
        if a.dtype != b.dtype or a.shape != b.shape:
            cmp.problems.append(
                f"{name}: mergearena {a.dtype}{tuple(a.shape)} "
                f"vs mergekit {b.dtype}{tuple(b.shape)}"
            )
            continue
        cmp.tensors += 1
        a32, b32 = a.float(), b.float()
        diff = (a32 - b32).abs_()
        max_diff = max(max_diff, diff.max().item())
        n_diff += int(torch.count_nonzero(diff).item())
        n_total += diff.numel()
        del diff
        if name in base_files:
            with safe_open(str(base_files[name]), framework="pt") as fbase:
                w0 = fbase.get_tensor(name).float()
            da2 += a32.sub_(w0).square_().sum(dtype=torch.float64).item()
            db2 += b32.sub_(w0).square_().sum(dtype=torch.float64).item()
            del w0
        del a, b, a32, b32
    if deterministic:
        cmp.max_abs_diff = max_diff
        cmp.frac_elements_differing = n_diff / n_total if n_total else None
    cmp.delta_norm_ratio = math.sqrt(da2 / db2) if db2 > 0 else None
    return cmp


def reference_merge(method: str, base, tensors: list, density: float):
    """float32 reference of linear / TIES (weights 0.5/0.5, normalized) for one tensor, in bf16.

    Both tools should match it up to bf16 rounding; mergekit 0.1.5 does the TIES arithmetic in the
    recipe dtype (bf16) and breaks magnitude ties with an unstable sort, so it differs from it in a
    few percent of the entries (sign elections of nearly cancelling deltas, the trim threshold).
    """
    import torch

    w = 0.5
    if method == "linear":
        out = sum(t.float() * w for t in tensors) / (w * len(tensors))
        return out.to(torch.bfloat16)
    b = base.float()
    deltas = []
    for t in tensors:
        d = t.float() - b
        k = max(1, int(density * d.numel()))
        keep = torch.argsort(d.abs().flatten(), descending=True, stable=True)[:k]
        mask = torch.zeros(d.numel(), dtype=torch.bool)
        mask[keep] = True
        deltas.append(d * mask.reshape(d.shape) * w)
    sign = torch.where(sum(deltas) >= 0, 1.0, -1.0)
    agree = [(torch.sign(d) == sign).float() for d in deltas]
    mixed = sum(d * a for d, a in zip(deltas, agree, strict=True))
    divisor = sum(a * w for a in agree)
    divisor[divisor == 0] = 1
    return (b + mixed / divisor).to(torch.bfloat16)


def reference_check(cmp: Comparison, outs: dict, paths: dict, name: str, density: float) -> None:
    from safetensors import safe_open

    def load(d: Path):
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                if name in fh.keys():
                    return fh.get_tensor(name)
        return None

    ref = reference_merge(
        cmp.method, load(paths["base"]), [load(paths["ft1"]), load(paths["ft2"])], density
    )
    cmp.reference_tensor = name
    for tool, out in outs.items():
        t = load(out)
        if t is None or t.shape != ref.shape:
            cmp.problems.append(f"{tool}: {name} missing or misshapen")
            continue
        cmp.reference_max_abs_diff[tool] = (t.float() - ref.float()).abs().max().item()


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def summarize(runs: list[Run], comparisons: dict[str, Comparison], methods, tools) -> list[dict]:
    rows = []
    for method in methods:
        row: dict = {"method": method}
        for tool in tools:
            ok = [r for r in runs if r.tool == tool and r.method == method and r.returncode == 0]
            failed = [
                r for r in runs if r.tool == tool and r.method == method and r.returncode != 0
            ]
            row[f"{tool}_wall_s"] = statistics.median(r.wall_s for r in ok) if ok else None
            row[f"{tool}_peak_rss_mb"] = max(r.peak_rss_mb for r in ok) if ok else None
            row[f"{tool}_failed"] = len(failed)
        if "mergekit" in tools and "mergearena" in tools:
            mk_t, ma_t = row["mergekit_wall_s"], row["mergearena_wall_s"]
            mk_m, ma_m = row["mergekit_peak_rss_mb"], row["mergearena_peak_rss_mb"]
            row["speedup"] = mk_t / ma_t if mk_t and ma_t else None
            row["rss_ratio"] = mk_m / ma_m if mk_m and ma_m else None
        c = comparisons.get(method)
        row["max_abs_diff"] = c.max_abs_diff if c else None
        row["frac_elements_differing"] = c.frac_elements_differing if c else None
        row["delta_norm_ratio"] = c.delta_norm_ratio if c else None
        for tool in ("mergekit", "mergearena"):
            row[f"{tool}_vs_reference"] = c.reference_max_abs_diff.get(tool) if c else None
        rows.append(row)
    return rows


def _fmt(v, spec: str, suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


ABBREV = {"mergekit": "mk", "mergearena": "ma"}


def print_table(rows: list[dict], tools, title: str) -> None:
    both = "mergekit" in tools and "mergearena" in tools
    headers = ["method"]
    for tool in tools:
        headers += [f"{ABBREV[tool]} wall", f"{ABBREV[tool]} peak RSS"]
    if both:
        headers += ["speedup mk/ma", "RSS mk/ma", "max |diff|", "Δ-norm ratio", "fp32 ref mk / ma"]
    body = []
    for r in rows:
        line = [r["method"]]
        for tool in tools:
            wall = _fmt(r[f"{tool}_wall_s"], ".1f", " s")
            if r[f"{tool}_failed"]:
                wall += f" ({r[f'{tool}_failed']} failed)"
            line += [wall, _fmt(r[f"{tool}_peak_rss_mb"], ",.0f", " MiB")]
        if both:
            deterministic = r["method"] in DETERMINISTIC
            mk_ref, ma_ref = r["mergekit_vs_reference"], r["mergearena_vs_reference"]
            line += [
                _fmt(r["speedup"], ".2f", "x"),
                _fmt(r["rss_ratio"], ".2f", "x"),
                _fmt(r["max_abs_diff"], ".3g") if deterministic else "n/a (random)",
                _fmt(r["delta_norm_ratio"], ".4f"),
                "-" if mk_ref is None or ma_ref is None else f"{mk_ref:.3g} / {ma_ref:.3g}",
            ]
        body.append(line)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        print("  ".join("-" * w for w in widths))
        for b in body:
            print("  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)))
        return
    table = Table()
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for b in body:
        table.add_row(*b)
    console = Console(width=max(150, shutil.get_terminal_size().columns))
    console.print(title, style="bold", highlight=False)
    console.print(table)


def markdown_table(payload: dict) -> str:
    """bench/README.md's table of a ``--json`` file of both tools: medians with every run, peak
    RSS, the ratios, agreement and whether the targets are met."""
    lines = [
        "| method | mergekit wall (runs) | mergekit peak RSS | mergearena wall (runs) "
        "| mergearena peak RSS | speedup mk/ma | RSS mk/ma | max \\|diff\\| | target met? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["summary"]:
        method, cells = row["method"], [row["method"]]
        for tool in ("mergekit", "mergearena"):
            walls = [
                r["wall_s"]
                for r in payload["runs"]
                if r["tool"] == tool and r["method"] == method and r["returncode"] == 0
            ]
            runs = ", ".join(f"{w:.1f}" for w in walls)
            cells += [
                f"{_fmt(row[f'{tool}_wall_s'], '.1f', ' s')} ({runs})",
                _fmt(row[f"{tool}_peak_rss_mb"], ",.0f", " MiB"),
            ]
        speedup, rss = row["speedup"], row["rss_ratio"]
        fast = speedup is not None and speedup >= TARGET_SPEEDUP[method]
        lean = rss is not None and rss >= TARGET_RSS_RATIO
        cells += [
            _fmt(speedup, ".2f", "×"),
            _fmt(rss, ".2f", "×"),
            _fmt(row["max_abs_diff"], ".3g") if method in DETERMINISTIC else "n/a (random)",
            f"speed {'yes' if fast else '**no**'}, RSS {'yes' if lean else '**no**'}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def source_stamp() -> dict:
    """The commit and a digest of src/ as it is on disk (the CLI under test may be uncommitted)."""
    import hashlib

    digest = hashlib.sha256()
    for f in sorted((REPO_ROOT / "src").rglob("*.py")):
        digest.update(str(f.relative_to(REPO_ROOT)).encode() + b"\0" + f.read_bytes())
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", ""
    return {"commit": commit, "src_dirty": bool(dirty), "src_sha256": digest.hexdigest()[:12]}


def _csv(value: str, allowed) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(allowed)}")
    return items


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--params",
        type=float,
        default=0.8e9,
        help="approximate parameters per checkpoint (0.1e9 for a quick run)",
    )
    p.add_argument(
        "--methods",
        type=lambda v: _csv(v, ALL_METHODS),
        default=list(ALL_METHODS),
        help="comma-separated: " + ",".join(ALL_METHODS),
    )
    p.add_argument(
        "--tools",
        type=lambda v: _csv(v, ALL_TOOLS),
        default=list(ALL_TOOLS),
        help="comma-separated: " + ",".join(ALL_TOOLS),
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="pass --threads N to mergearena and --num-threads N to mergekit "
        "(default: neither, each tool's own default)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per tool and method (table: median wall time, max peak RSS)",
    )
    p.add_argument("--json", type=Path, default=None, help="write all runs and the summary here")
    p.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="print bench/README.md's table of an earlier --json file of both tools, and stop",
    )
    p.add_argument("--density", type=float, default=0.5, help="density for ties and dare_ties")
    p.add_argument(
        "--noise",
        type=float,
        default=0.002,
        help="std of the fine-tune deltas (base weights have std 0.02)",
    )
    p.add_argument("--shard-mb", type=int, default=500, help="input shard size in MiB")
    p.add_argument("--seed", type=int, default=0, help="seed for the random checkpoints")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    p.add_argument("--mergekit-bin", type=Path, default=DEFAULT_MERGEKIT)
    p.add_argument("--mergearena-bin", type=Path, default=DEFAULT_MERGEARENA)
    p.add_argument("--mergekit-args", default="", help="extra arguments for mergekit-yaml")
    p.add_argument("--mergearena-args", default="", help="extra arguments for mergearena merge")
    p.add_argument("--keep-outputs", action="store_true", help="do not delete the merged models")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.markdown:
        print(markdown_table(json.loads(args.markdown.read_text())))
        return 0
    for tool in args.tools:
        exe = args.mergekit_bin if tool == "mergekit" else args.mergearena_bin
        if not Path(exe).exists():
            hint = (
                "run: bash bench/setup_mergekit.sh"
                if tool == "mergekit"
                else "install the project: .venv/bin/pip install -e . --no-deps"
            )
            print(f"error: {tool} executable not found at {exe} ({hint})", file=sys.stderr)
            return 2
    work: Path = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    shape = Shape.for_params(args.params)
    print(
        f"model shape: hidden {shape.hidden}, intermediate {shape.intermediate}, "
        f"{shape.layers} layers, {shape.heads} heads / {shape.kv_heads} kv heads, "
        f"vocab {shape.vocab}: {shape.total_params() / 1e9:.3f}B params "
        f"({2 * shape.total_params() / 2**30:.2f} GiB bf16 per model)"
    )
    paths = ensure_checkpoints(work, shape, args.shard_mb << 20, args.noise, args.seed)
    stamp = source_stamp()
    print(
        f"mergearena source: commit {stamp['commit']}"
        f"{' + uncommitted changes' if stamp['src_dirty'] else ''}, "
        f"src sha256 {stamp['src_sha256']}"
    )

    run_dir = work / "runs"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warm_page_cache(paths)

    runs: list[Run] = []
    comparisons: dict[str, Comparison] = {}
    for method in args.methods:
        recipe = run_dir / f"{method}.yaml"
        recipe.write_text(recipe_yaml(method, paths, args.density))
        for rep in range(args.repeat):
            outs: dict[str, Path] = {}
            for tool in args.tools:
                out = run_dir / f"out-{tool}-{method}-{rep}"
                shutil.rmtree(out, ignore_errors=True)
                log = run_dir / f"{tool}-{method}-{rep}.log"
                cmd = tool_command(tool, args, recipe, out)
                os.sync()  # previous outputs' dirty pages should not be flushed during this run
                wall, rss, rc, cpu, other = run_tool(cmd, log, env)
                run = Run(tool, method, rep, wall, rss, rc, cpu, other, shlex.join(cmd), str(log))
                runs.append(run)
                status = "ok" if rc == 0 else f"FAILED (exit {rc}), log: {log}"
                busy = ""
                if other is not None and other > 0.1 * wall:
                    busy = f"  [other processes used {other:.0f} CPU-s meanwhile: timing disturbed]"
                print(
                    f"  {method:<9} {tool:<10} run {rep + 1}/{args.repeat}: "
                    f"{wall:7.1f} s, peak RSS {rss:8,.0f} MiB, CPU {cpu:6.1f} s  {status}{busy}",
                    flush=True,
                )
                if rc != 0:
                    tail = log.read_text(errors="replace").splitlines()[-15:]
                    print("    | " + "\n    | ".join(tail), file=sys.stderr)
                else:
                    outs[tool] = out
            if rep == 0 and len(outs) == 2:
                cmp = compare_outputs(
                    method,
                    outs["mergearena"],
                    outs["mergekit"],
                    paths["base"],
                    method in DETERMINISTIC,
                )
                comparisons[method] = cmp
                if method in DETERMINISTIC:
                    reference_check(
                        cmp, outs, paths, "model.layers.0.mlp.up_proj.weight", args.density
                    )
                    print(
                        "    float32 reference on model.layers.0.mlp.up_proj.weight: max |diff| "
                        + ", ".join(f"{t} {v:.3g}" for t, v in cmp.reference_max_abs_diff.items())
                    )
                for prob in cmp.problems:
                    print(f"    problem: {prob}")
            if not args.keep_outputs:
                for out in outs.values():
                    shutil.rmtree(out, ignore_errors=True)

    rows = summarize(runs, comparisons, args.methods, args.tools)
    title = (
        f"merge speed, {shape.total_params() / 1e9:.2f}B-param Llama bf16, 3 models, "
        f"{os.cpu_count()} CPUs, threads={args.threads or 'default'}, repeat={args.repeat}"
    )
    print()
    print_table(rows, args.tools, title)
    if len(args.tools) == 2:
        print(
            "mk = mergekit, ma = mergearena; wall: median over repeats; peak RSS: max.\n"
            "max |diff|: largest elementwise difference between the two outputs (bf16).\n"
            "Δ-norm ratio: ||mergearena - base|| / ||mergekit - base||, ~1 when they agree.\n"
            "vs fp32 ref: max |diff| of each output from a float32 merge of one tensor "
            "(layer 0 up_proj) computed here."
        )
    if args.json:
        payload = {
            "argv": sys.argv,
            "mergearena_source": stamp,
            "params": shape.total_params(),
            "shape": asdict(shape),
            "host": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "runs": [asdict(r) for r in runs],
            "comparisons": {k: asdict(v) for k, v in comparisons.items()},
            "summary": rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    failed = any(r.returncode != 0 for r in runs)
    problems = any(c.problems for c in comparisons.values())
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
