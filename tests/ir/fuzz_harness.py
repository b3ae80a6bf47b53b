"""Seeded mutations of real ``.ivit`` programs (run by ``test_fuzz.py`` in a memory-limited subprocess).

Each mutant is written with a valid checksum (as anyone editing a file would), then loaded; a refusal
must be one ``ProgramError`` line, and a program that loads must run on every backend with the same
integers.  Anything else (another exception, a crash, a hang, a large allocation) is a failure.
Prints one JSON line: counts and the failures.
"""

from __future__ import annotations

import copy
import io
import json
import random
import resource
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save

import ivit
import ivit.cli
from ivit.ir import Program, ProgramError, load_program
from ivit.ir import program as program_mod

EXTREME_INTS = [-(2**62), -(2**31), -(2**31) + 1, -65536, -129, -128, -2, -1, 0, 1, 2, 3, 7, 8, 15, 16, 31, 32,
                62, 63, 64, 127, 255, 4096, 2**20, 2**31 - 1, 2**31, 10**7, 10**12]
#: the native backends checked against the reference on every mutant that loads (compiled: where a C compiler is)
BACKENDS = ["cpu", *(["compiled"] if ivit.backends.get_backend("compiled").available() else [])]
DTYPES = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool, torch.float32]


def signed_bytes(prog: Program, meta_override: dict | None = None) -> bytes:
    graph = prog.graph_json()
    consts = {k: v.contiguous() for k, v in prog.consts.items()}
    md = {"format": "ivit", "format_version": "2", "program": graph, "checksum": program_mod._checksum(graph, consts)}
    return save(consts, metadata=md)


def clone(p: Program) -> Program:
    return Program([replace(n, consts=dict(n.consts), attrs=copy.deepcopy(n.attrs)) for n in p.nodes],
                   {k: v.clone() for k, v in p.consts.items()}, p.input, p.output, copy.deepcopy(p.meta))


def mutate(p: Program, rng: random.Random) -> tuple[Program, str]:
    q = clone(p)
    kind = rng.choice(["attr", "attr", "attr", "const_shape", "const_values", "const_values", "const_dtype",
                       "order", "inputs", "meta", "op", "output", "drop_const", "extra_const"])
    i = rng.randrange(len(q.nodes))
    n = q.nodes[i]
    desc = f"{kind} node {i} ({n.op})"
    if kind == "attr":
        if n.attrs and rng.random() < 0.85:
            a = rng.choice(sorted(n.attrs))
            v = n.attrs[a]
            if isinstance(v, list):
                w = list(v)
                r = rng.random()
                if r < 0.3 and w:
                    w[rng.randrange(len(w))] = rng.choice(EXTREME_INTS)
                elif r < 0.5:
                    w.append(rng.choice(EXTREME_INTS))
                elif r < 0.7 and w:
                    w.pop()
                elif w:
                    rng.shuffle(w)
                new: object = w
            else:
                new = rng.choice(EXTREME_INTS + [v + rng.choice([-1, 1])])
            attrs = {**n.attrs, a: new}
            desc += f" {a}={str(new)[:40]}"
        else:
            attrs = {**n.attrs, rng.choice(["bogus", "bits", "dim", "x0"]): rng.choice(EXTREME_INTS)}
            desc += " added attr"
        q.nodes[i] = replace(n, attrs=attrs)
    elif kind in ("const_shape", "const_values", "const_dtype") and n.consts:
        c = rng.choice(sorted(n.consts))
        key = n.consts[c]
        t = q.consts[key]
        if kind == "const_shape":
            r = rng.random()
            if r < 0.25:
                t = t.reshape(-1)[:1].clone()
            elif r < 0.5:
                t = t.reshape(-1, 1).clone()
            elif r < 0.7 and t.numel() > 1:
                t = t.reshape(-1)[: t.numel() // 2].clone()
            elif r < 0.85:
                t = t.reshape(-1).repeat(2).clone()
            else:
                t = t.reshape(-1)[:0].clone()
            desc += f" {c} shape {tuple(t.shape)}"
        elif kind == "const_values":
            if t.dtype == torch.bool:
                t = ~t
            else:
                info = torch.iinfo(t.dtype)
                v = rng.choice([info.min, info.max, 0, -1, 1])
                if rng.random() < 0.5:
                    t = torch.full_like(t, v)
                else:
                    t = t.clone()
                    t.view(-1)[rng.randrange(max(1, t.numel()))] = v
            desc += f" {c} values"
        else:
            dt = rng.choice(DTYPES)
            t = t.to(dt)
            desc += f" {c} dtype {dt}"
        q.consts[key] = t
    elif kind == "order" and i + 1 < len(q.nodes):
        q.nodes[i], q.nodes[i + 1] = q.nodes[i + 1], q.nodes[i]
    elif kind == "inputs" and n.inputs:
        values = [q.input] + [m.output for m in q.nodes]
        ins = list(n.inputs)
        r = rng.random()
        if r < 0.6:
            ins[rng.randrange(len(ins))] = rng.choice(values)
        elif r < 0.8:
            ins.append(rng.choice(values))
        else:
            ins[0] = "nowhere"
        q.nodes[i] = replace(n, inputs=tuple(ins))
    elif kind == "meta":
        key = rng.choice(["input_shape", "num_classes", "logit_scale", "family", "model"])
        val = rng.choice([[3, 10**5, 10**5], [0, 32, 32], [3, 32], [3, 16, 16], 10**9, -1, 0, "x", None, 1e308,
                          [[[[1]]]], 7, 1000])
        q.meta[key] = val
        desc += f" {key}={str(val)[:30]}"
    elif kind == "op":
        others = sorted(ivit.ir.OPSET)
        q.nodes[i] = replace(n, op=rng.choice(others))
        desc += f" -> {q.nodes[i].op}"
    elif kind == "output":
        q.output = rng.choice([q.input] + [m.output for m in q.nodes])
    elif kind == "drop_const" and n.consts:
        c = rng.choice(sorted(n.consts))
        q.nodes[i] = replace(n, consts={k: v for k, v in n.consts.items() if k != c})
        desc += f" {c}"
    elif kind == "extra_const":
        q.consts["unused.extra"] = torch.zeros(3, dtype=torch.int32)
    else:
        desc += " (no-op)"
    return q, desc


def main() -> None:
    src, n_mut, seed, mem_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(1)
    progs = [load_program(p) for p in src.split(",")]
    # hard memory guard for everything after start-up: address space may grow by at most mem_mb
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + mem_mb * 2**20, resource.RLIM_INFINITY))
    rng = random.Random(seed)
    tmp = Path(sys.argv[5])
    counts = {"refused": 0, "ran": 0, "unchanged": 0}
    failures: list[str] = []
    for k in range(n_mut):
        base = progs[k % len(progs)]
        mutant, desc = mutate(base, rng)
        path = tmp / f"m{k}.ivit"
        path.write_bytes(signed_bytes(mutant))
        try:
            prog = load_program(path)
        except ProgramError as e:
            msg = str(e)
            if "\n" in msg or not msg.startswith("invalid program in") and "not an .ivit" not in msg \
                    and "checksum" not in msg:
                failures.append(f"{desc}: refusal not one clean line: {msg[:200]!r}")
            counts["refused"] += 1
            if k % 10 == 0:  # the CLI says the same in one line, exit 2
                out, err = io.StringIO(), io.StringIO()
                try:
                    with redirect_stdout(out), redirect_stderr(err):
                        rc = ivit.cli.main(["inspect", str(path)])
                except BaseException as e:  # noqa: BLE001 - an escaping exception is a failure of the CLI
                    failures.append(f"{desc}: cli inspect raised {type(e).__name__}: {str(e)[:200]}")
                    continue
                lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
                if rc != 2 or len(lines) != 1 or not lines[0].startswith("ivit: error: "):
                    failures.append(f"{desc}: cli inspect rc={rc} stderr={err.getvalue()[:300]!r}")
            continue
        except Exception as e:  # noqa: BLE001 - anything but a ProgramError is a failure
            failures.append(f"{desc}: load raised {type(e).__name__}: {str(e)[:200]}")
            continue
        try:
            c, h, w = prog.input_shape
            x = torch.randint(0, 256, (2, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
            ref = ivit.Engine(prog, backend="reference")(x)
            for backend in BACKENDS:
                if not torch.equal(ref, ivit.Engine(prog, backend=backend)(x)):
                    failures.append(f"{desc}: backend {backend} disagrees with the reference")
            counts["ran"] += 1
        except Exception as e:  # noqa: BLE001
            failures.append(f"{desc}: a loaded program failed to run: {type(e).__name__}: {str(e)[:200]}")
        path.unlink()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("FUZZ " + json.dumps({"counts": counts, "failures": failures, "peak_rss": peak}))


if __name__ == "__main__":
    main()
