"""The benchmark report: records from a pytest-benchmark JSON file, a markdown table, a PNG chart.

A record is one implementation in one group: ``group``, ``impl``, ``median`` (seconds) and what
bench/conftest.py stored in ``extra_info``: ``bytes`` / ``flops`` per call, ``dtype``, the memory roof
measured for that working set, ``gemm_peak`` (the group's peers set the GEMM roof), ``samples/s``,
``min_side`` (the smallest product side: no GEMM roof below :data:`GEMM_MIN_SIDE`) and ``unlike`` (the
implementations do different work: no speed ratio and no chart bars for the group, a note instead).
The GEMM roof of each dtype is the best peer (any implementation but numba) in the run's peak groups,
via :func:`kernels.profile.gemm_roof`: the same roofs as the profiler.
"""

import os
import platform

from kernels.profile import gemm_roof

OURS = "numba"
# Below this smallest product side (a matmul's min(M, K, N), a training step's batch) the products are
# matrix-vector-like and the square-GEMM roof says more about the shape than the kernel: no roof is given.
GEMM_MIN_SIDE = 16
ORDER = ["numpy", "numba", "numba-per-kernel", "torch", "torch-foreach", "torch.compile", "jax", "jax-scan"]


def machine():
    """The machine a run measured: CPU model, family, LLVM's CPU name, cores, vector width, libraries."""
    info = {"cpu": platform.processor() or "unknown", "family": "?", "cores": len(os.sched_getaffinity(0))}
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info.update(cpu=fields.get("model name", info["cpu"]), family=fields.get("cpu family", "?"),
                    model=fields.get("model", "?"))
        flags = fields.get("flags", "").split()
        info["vector bits"] = 512 if "avx512f" in flags else 256 if "avx2" in flags else 128
    except OSError:
        pass
    import llvmlite.binding
    import numba
    import numpy

    info["llvm cpu"] = llvmlite.binding.get_host_cpu_name()
    versions = {"numpy": numpy.__version__, "numba": numba.__version__}
    for name in ("torch", "jax"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    versions["OpenBLAS"] = openblas()
    info["libraries"] = versions
    return info


def openblas():
    """Which OpenBLAS NumPy runs (threadpoolctl): version, kernel family, and any variable forcing it."""
    from kernels.cpu._cpuinfo import numpy_blas

    try:
        blas = numpy_blas()
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    if blas is None or blas["internal_api"] != "openblas":
        return "not NumPy's BLAS"
    forced = [f"{v}={os.environ[v]}" for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if v in os.environ]
    return (f"{blas['version']} ({blas.get('architecture')} kernels"
            + (f", forced by {' '.join(forced)}: unset both for native kernels)" if forced else ", native)"))


def machine_line(info):
    libs = ", ".join(f"{k} {v}" for k, v in info.get("libraries", {}).items())
    return (f"{info.get('cpu')} (family {info.get('family')}, model {info.get('model', '?')}, LLVM "
            f"{info.get('llvm cpu')}), {info.get('cores')} cores, {info.get('vector bits')}-bit vectors; {libs}")


def records_of(group, median, extra, name=None):
    """The records of one timed benchmark: its own (``impl`` from ``extra``, else ``name``), then one per
    implementation timed alongside it (``extra["peers"]``: bench/conftest.py's ``alternate``)."""
    own = {k: v for k, v in extra.items() if k != "peers"}
    shared = {k: v for k, v in own.items() if k not in ("impl", "samples/s", "us/step")}
    return [dict(own, group=group, impl=extra.get("impl", name), median=median)] + [
        dict(shared, group=group, impl=impl, median=peer["median"]) for impl, peer in extra.get("peers", {}).items()]


def records_from_json(data):
    """The records of a pytest-benchmark JSON document (timed benchmarks only) and its machine info."""
    records = []
    for b in data.get("benchmarks", []):
        if b.get("stats") and b["stats"].get("median"):
            records += records_of(b["group"], b["stats"]["median"], b.get("extra_info", {}), b["name"])
    return records, data.get("machine_info", {}).get("kernels", {})


def gemm_roofs(records):
    """``{dtype: Roof}``: the best GFLOP/s any peer of ours reached in a GEMM peak group, per dtype."""
    rates = {}
    for r in records:
        if r.get("gemm_peak") and r.get("flops") and r["impl"] != OURS:
            best = rates.setdefault(r.get("dtype"), {})
            rate = r["flops"] / r["median"] / 1e9
            best[r["impl"]] = max(best.get(r["impl"], 0.0), rate)
    return {dtype: gemm_roof(peers) for dtype, peers in rates.items()}


def groups(records):
    """``{group: {impl: record}}`` in the order the run measured them."""
    out = {}
    for r in records:
        out.setdefault(r["group"], {})[r["impl"]] = r
    return out


def _rate(r):
    if r.get("flops"):
        return r["flops"] / r["median"] / 1e9, "GFLOP/s"
    if r.get("bytes"):
        return r["bytes"] / r["median"] / 1e9, "GB/s"
    return None, ""


def rows(records):
    """One dict per group: medians per implementation, numba's speed over the best peer, its throughput,
    the fraction of the roof and which roof."""
    roofs = gemm_roofs(records)
    result = []
    for group, impls in groups(records).items():
        ours = impls.get(OURS)
        unlike = next((r["unlike"] for r in impls.values() if r.get("unlike")), None)
        peers = {k: v["median"] for k, v in impls.items() if not k.startswith(OURS)}  # not our other forms
        best = min(peers, key=peers.get) if peers and not unlike else None
        row = dict(group=group, medians={k: v["median"] for k, v in impls.items()}, best_peer=best,
                   vs_best=peers[best] / ours["median"] if ours and best else None, rate=None, unit="",
                   roof=None, roof_what="", ratios={k: (peers[best] / v["median"] if best else None)
                                                    for k, v in impls.items()} if best else {})
        if unlike:
            row["unlike"] = unlike
        if ours:
            row["rate"], row["unit"] = _rate(ours)
            if row["unit"] == "GB/s" and ours.get("memory_roof"):
                row["roof"], row["roof_what"] = row["rate"] / ours["memory_roof"], (
                    f"{ours['memory_roof']:.0f} GB/s, {ours.get('memory_roof_what', 'copy')}")
            elif row["unit"] == "GFLOP/s" and ours.get("min_side", GEMM_MIN_SIDE) < GEMM_MIN_SIDE:
                row["roof_what"] = f"none: smallest side {ours['min_side']} < {GEMM_MIN_SIDE}"
            elif row["unit"] == "GFLOP/s" and roofs.get(ours.get("dtype")):
                roof = roofs[ours["dtype"]]
                row["roof"], row["roof_what"] = row["rate"] / roof.value, f"{roof.value:.0f} GFLOP/s {ours['dtype']}"
            if ours.get("samples/s"):
                row["samples/s"] = ours["samples/s"]
        result.append(row)
    return result


def _ms(seconds):
    return f"{seconds * 1e3:.3g}" if seconds < 10 else f"{seconds:.3g} s"


def table(records, info=None):
    """The markdown report: the machine, the roofs, then one line per group (medians in ms)."""
    impls = [i for i in ORDER if any(r["impl"] == i for r in records)]
    impls += sorted({r["impl"] for r in records} - set(impls))
    lines = []
    if info:
        lines += [f"Machine: {machine_line(info)}", ""]
    for dtype, roof in sorted(gemm_roofs(records).items(), key=lambda kv: str(kv[0])):
        if roof:
            lines.append(f"GEMM roof {dtype}: {roof.value:.0f} GFLOP/s, {roof.what}")
    lines += ["Memory roofs: a copy with the kernel's thread count and working set (in-place kernels: an in-place "
              f"read-modify-write), measured in the same run; no GEMM roof below a side of {GEMM_MIN_SIDE}.",
              "", "| kernel or model, shape | " + " | ".join(f"{i} ms" for i in impls)
              + " | numba vs best peer | numba throughput | of roof | roof |",
              "|---|" + "---:|" * len(impls) + "---:|---:|---:|---|"]
    for row in rows(records):
        cells = [_ms(row["medians"][i]) if i in row["medians"] else "" for i in impls]
        vs = f"{row['vs_best']:.2f}x ({row['best_peer']})" if row["vs_best"] else ""
        rate = f"{row['rate']:.1f} {row['unit']}" if row["rate"] else ""
        if row.get("samples/s"):
            rate += f", {row['samples/s'] / 1e3:.1f}k samples/s"
        roof = f"{row['roof']:.0%}" if row["roof"] is not None else ""
        if row.get("unlike"):
            vs = "not like-for-like"
        lines.append(f"| {row['group']} | " + " | ".join(cells) + f" | {vs} | {rate} | {roof} | {row['roof_what']} |")
    notes = [f"- {row['group']}: not like-for-like, {row['unlike']}." for row in rows(records) if row.get("unlike")]
    return "\n".join(lines + ([""] + notes if notes else []))


def plot(records, path):
    """A PNG: each implementation's speed relative to the best peer per group (1 = the best peer), and
    numba's roof (the roof's speed relative to the best peer) as a black tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [row for row in rows(records) if not row.get("unlike")]  # no ratio where the work differs
    impls = [i for i in ORDER if any(i in row["ratios"] for row in data)]
    impls += sorted({i for row in data for i in row["ratios"]} - set(impls))
    height = 0.8 / max(len(impls), 1)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(data) + 1.5))
    for j, impl in enumerate(impls):
        ys = [i + j * height for i, row in enumerate(data) if row["ratios"].get(impl)]
        xs = [row["ratios"][impl] for row in data if row["ratios"].get(impl)]
        ax.barh(ys, xs, height, label=impl)
    for i, row in enumerate(data):
        if row["roof"] and row["vs_best"]:
            ax.plot([row["vs_best"] / row["roof"]] * 2, [i - 0.1, i + 0.9], color="black", lw=2,
                    label="roof" if i == next(k for k, r in enumerate(data) if r["roof"] and r["vs_best"]) else None)
    ax.axvline(1.0, color="grey", ls="--", lw=1)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(data))], [row["group"] for row in data], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speed relative to the best peer (higher is faster; black: the roof)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
