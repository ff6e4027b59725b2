"""The benchmark report (bench/_report.py) on a small synthetic pytest-benchmark JSON: parsing, the table's
ratios and roofs, the chart. No timing."""

import pytest

from bench import _report

MACHINE = {"cpu": "AMD EPYC", "family": "25", "model": "1", "llvm cpu": "znver3", "cores": 2, "vector bits": 256,
           "libraries": {"numpy": "2.0", "OpenBLAS": "0.3.31 (Haswell kernels)"}}


def _bench(group, impl, median, **extra):
    return {"group": group, "name": f"test[{impl}]", "stats": {"median": median}, "extra_info": dict(extra, impl=impl)}


def _doc():
    gemm = 2 * 1024**3
    return {"machine_info": {"kernels": MACHINE}, "benchmarks": [
        _bench("matmul 1024^3 float32", "numpy", gemm / 250e9, flops=gemm, dtype="float32", gemm_peak=True),
        _bench("matmul 1024^3 float32", "numba", gemm / 200e9, flops=gemm, dtype="float32", gemm_peak=True),
        _bench("matmul 1024^3 float32", "jax", gemm / 500e9, flops=gemm, dtype="float32", gemm_peak=True),
        _bench("relu 16M f32", "numpy", 0.010, bytes=2e8, dtype="float32", memory_roof=40.0,
               memory_roof_what="2-thread copy of 200 MiB (DRAM)"),
        _bench("relu 16M f32", "numba", 0.008, bytes=2e8, dtype="float32", memory_roof=40.0,
               memory_roof_what="2-thread copy of 200 MiB (DRAM)"),
        _bench("relu 16M f32", "torch", 0.005, bytes=2e8, dtype="float32"),
        _bench("train 64-128-10 b32 Adam f32", "numba", 0.5, flops=1e9, dtype="float32", **{"samples/s": 4096.0}),
        _bench("train 64-128-10 b32 Adam f32", "torch.compile", 1.0, flops=1e9, dtype="float32"),
        {"group": "smoke only", "name": "x", "stats": None, "extra_info": {"impl": "numba"}},  # not timed
    ]}


def test_parses_timed_benchmarks_and_the_machine():
    records, info = _report.records_from_json(_doc())
    assert info == MACHINE
    assert len(records) == 8 and all(r["group"] != "smoke only" for r in records)
    assert records[0]["impl"] == "numpy" and records[0]["median"] == pytest.approx(2 * 1024**3 / 250e9)


def test_peers_timed_alongside_become_records_of_their_own():
    """bench/conftest.py's ``alternate`` stores the peers' medians in the timed benchmark's extra_info."""
    peers = {"jax-scan": {"median": 0.25, "rounds": 12, "min": 0.2, "max": 0.3},
             "numba-per-kernel": {"median": 0.75, "rounds": 4, "min": 0.7, "max": 0.8}}
    doc = {"benchmarks": [_bench("train b1", "numba", 0.5, flops=1e9, min_side=1, peers=peers,
                                 **{"samples/s": 512.0, "us/step": 10.0})]}
    records, _ = _report.records_from_json(doc)
    assert [(r["impl"], r["median"]) for r in records] == [("numba", 0.5), ("jax-scan", 0.25),
                                                           ("numba-per-kernel", 0.75)]
    assert all(r["group"] == "train b1" and r["flops"] == 1e9 and r["min_side"] == 1 and "peers" not in r
               for r in records)
    assert records[0]["samples/s"] == 512.0 and "samples/s" not in records[1]  # ours' rate is not a peer's
    (row,) = _report.rows(records)
    assert row["best_peer"] == "jax-scan" and row["vs_best"] == pytest.approx(0.5)  # not our other form


def test_gemm_roof_is_the_best_peer_never_numba():
    records, _ = _report.records_from_json(_doc())
    roof = _report.gemm_roofs(records)["float32"]
    assert roof.value == pytest.approx(500.0)
    assert "jax" in roof.what and "numba" not in roof.what


def test_rows_ratios_and_roofs():
    records, _ = _report.records_from_json(_doc())
    rows = {r["group"]: r for r in _report.rows(records)}
    gemm, relu, train = rows["matmul 1024^3 float32"], rows["relu 16M f32"], rows["train 64-128-10 b32 Adam f32"]
    assert gemm["best_peer"] == "jax" and gemm["vs_best"] == pytest.approx(0.4)
    assert gemm["rate"] == pytest.approx(200.0) and gemm["roof"] == pytest.approx(0.4)
    assert relu["best_peer"] == "torch" and relu["vs_best"] == pytest.approx(0.625)
    assert relu["rate"] == pytest.approx(25.0) and relu["roof"] == pytest.approx(25 / 40)
    assert "DRAM" in relu["roof_what"]
    assert train["vs_best"] == pytest.approx(2.0) and train["roof"] == pytest.approx(2.0 / 500)
    assert train["ratios"] == {"numba": pytest.approx(2.0), "torch.compile": pytest.approx(1.0)}


def test_table_has_every_column_and_row():
    records, info = _report.records_from_json(_doc())
    text = _report.table(records, info)
    lines = text.splitlines()
    assert lines[0].startswith("Machine: AMD EPYC (family 25, model 1, LLVM znver3), 2 cores, 256-bit vectors")
    assert "OpenBLAS 0.3.31 (Haswell kernels)" in lines[0]
    assert "GEMM roof float32: 500 GFLOP/s, best GEMM peer jax" in text
    header = next(line for line in lines if line.startswith("| kernel"))
    assert header.split(" | ")[1:6] == ["numpy ms", "numba ms", "torch ms", "torch.compile ms", "jax ms"]
    relu = next(line for line in lines if line.startswith("| relu"))
    cells = [c.strip() for c in relu.strip("|").split("|")]
    assert cells[1:6] == ["10", "8", "5", "", ""]
    assert cells[6] == "0.62x (torch)" and cells[7] == "25.0 GB/s" and cells[8] == "62%"
    train = next(line for line in lines if line.startswith("| train"))
    assert "4.1k samples/s" in train and "2.00x (torch.compile)" in train


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    records, _ = _report.records_from_json(_doc())
    path = tmp_path / "bench.png"
    _report.plot(records, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size < 200_000
