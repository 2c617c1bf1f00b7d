"""lowbit.bench suite interface: Row validation, records (ratios, peers, absent), CSV columns, the CLI."""
import textwrap
from pathlib import Path

import pytest

import lowbit.bench
from lowbit.bench import cli, harness, suite
from lowbit.bench.harness import ABSENT, NOT_APPLICABLE, Limits, Timing
from lowbit.bench.suite import Context, Row


class FakeSuite:
    PARAMS = ("format",)
    PEERS = {"torch": None, "ghost": "lowbit_no_such_package"}


def ctx_for(tmp_path, **kw) -> Context:
    limits = Limits({"copy_GB/s": 10.0, "fp32_mm_TFLOP/s": 0.1}, {"copy_GB/s": Timing("copy_", [0.01, 0.02])})
    args = dict(device="cpu", machine="m", backend=None, shapes=[], tokens=16, quick=True, out=tmp_path,
                limits=limits, console=lambda s: None)
    args.update(kw)
    return Context(**args)


def test_row_rate_and_validation():
    r = Row("c", Timing("t", [0.002]), work=4e7, unit="GB/s", limit="copy_GB/s")
    assert r.rate == pytest.approx(20.0)  # 40 MB in 2 ms
    assert Row("c", None, work=1.0, unit="GB/s").rate is None
    with pytest.raises(ValueError, match="unit"):
        Row("c", None, unit="GB")
    with pytest.raises(ValueError, match="limit"):
        Row("c", None, unit="TFLOP/s", limit="copy_GB/s")


def test_record_ratios_and_peer_columns(tmp_path):
    ctx = ctx_for(tmp_path)
    row = Row("nvfp4", Timing("t", [0.002]), shape="4x4", work=4e7, unit="GB/s", limit="copy_GB/s",
              peers={"torch": Timing("p", [0.006]), "ghost": Timing("g", [1.0])}, params={"format": "nvfp4"})
    rec = suite.record(row, FakeSuite, ctx, "fake")
    assert rec["rate"] == pytest.approx(20.0) and rec["limit_value"] == 10.0
    assert rec["ratio_to_limit"] == pytest.approx(2.0)
    assert rec["torch_p50_ms"] == pytest.approx(6.0) and rec["speedup_vs_torch"] == pytest.approx(3.0)
    # a peer whose package is not installed is absent, whatever the suite reported
    assert rec["ghost_p50_ms"] == ABSENT and rec["speedup_vs_ghost"] == ABSENT
    assert rec["backend"] == "auto" and rec["format"] == "nvfp4"
    rec = suite.record(Row("x", Timing("t", [1.0])), FakeSuite, ctx, "fake")
    assert rec["speedup_vs_torch"] == NOT_APPLICABLE  # declared peer not reported by the row: n/a
    with pytest.raises(ValueError, match="PARAMS"):
        suite.record(Row("x", None, params={"rounding": "nearest"}), FakeSuite, ctx, "fake")


def test_columns_and_csv_schema(tmp_path):
    cols = suite.columns(FakeSuite)
    assert cols[:7] == suite.HEAD and cols[7] == "format"
    assert cols[-5:] == ["torch_p50_ms", "speedup_vs_torch", "ghost_p50_ms", "speedup_vs_ghost", "note"]
    ctx = ctx_for(tmp_path)
    rows = [Row("a", Timing("t", [0.001, 0.002, 0.003]), work=1e6, unit="GB/s", limit="copy_GB/s",
                peers={"torch": "skipped: too big"}, params={"format": "mxfp4"})]
    path, records = suite.finish("fake", FakeSuite, rows, ctx)
    assert path == tmp_path / "fake-quick.csv" and (tmp_path / "fake-quick.png").exists()
    back = harness.read_csv(path)
    assert list(back[0]) == cols
    assert [r["case"] for r in back] == ["limit copy_GB/s", "limit fp32_mm_TFLOP/s", "a"]
    assert back[0]["rate"] == "10" and back[1]["p50_ms"] == ""  # a limit without a timing has no p50
    assert back[2]["p50_ms"] == "2" and back[2]["speedup_vs_torch"] == "skipped: too big"
    assert back[2]["ghost_p50_ms"] == "absent"


def test_context_models_and_time(tmp_path):
    ctx = ctx_for(tmp_path)
    assert [m.name for m in ctx.models(default=("llama-8b",), quick=("tiny",))] == ["tiny"]
    assert [m.name for m in ctx_for(tmp_path, quick=False).models(default=("llama-8b",))] == ["llama-8b"]
    assert [m.name for m in ctx_for(tmp_path, shapes=["llama-1b"]).models(default=("tiny",))] == ["llama-1b"]
    t = ctx.time(lambda: None, min_runs=2, min_time=0.0)
    assert len(t.samples) >= 2
    assert ctx.installed(None) and ctx.installed("torch") and not ctx.installed("lowbit_no_such_package")


@pytest.fixture
def extra_suites(tmp_path, monkeypatch):
    """A folder added to lowbit.bench's package path holding a working and a broken suite."""
    d = tmp_path / "suites"
    d.mkdir()
    (d / "zz_fake.py").write_text(textwrap.dedent('''
        from lowbit.bench import Row, Timing
        DESCRIPTION = "a fake suite"
        PARAMS = ()
        PEERS = {"torch": None}
        def run(ctx):
            return [Row("one", ctx.time(lambda: sum(range(100)), min_runs=2, min_time=0.0), work=1e3,
                        unit="GB/s", limit="copy_GB/s", peers={"torch": "n/a"})]
    '''))
    (d / "zz_broken.py").write_text("import lowbit_no_such_package\n")
    monkeypatch.setattr(lowbit.bench, "__path__", [*lowbit.bench.__path__, str(d)])
    monkeypatch.setattr(cli, "KNOWN", (*cli.KNOWN, "zz_not_landed"))
    monkeypatch.setattr(harness.Limits, "measure", classmethod(
        lambda cls, device="cpu", quick=False, **kw: cls({"copy_GB/s": 10.0, "fp32_mm_TFLOP/s": 0.1})))
    return d


def test_discovery_reports_missing_and_broken_suites(extra_suites):
    found, missing = cli.discover()
    assert {"quantize", "hadamard", "qmatmul", "loss", "zz_fake"} <= set(found)
    assert "not part of this installation" in missing["zz_not_landed"]
    assert "import failed" in missing["zz_broken"] and "lowbit_no_such_package" in missing["zz_broken"]
    assert not {"cli", "harness", "shapes", "suite"} & (set(found) | set(missing))


def test_cli_runs_a_suite_and_reports_unavailable_ones(extra_suites, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["zz_fake", "--quick", "--out", str(out)]) == 0
    rows = harness.read_csv(out / "zz_fake-quick.csv")
    assert rows[-1]["case"] == "one" and rows[-1]["ratio_to_limit"] and rows[-1]["speedup_vs_torch"] == "n/a"
    assert cli.main(["zz_not_landed", "--out", str(out)]) == 2
    assert "zz_not_landed: not available" in capsys.readouterr().out
    assert cli.main(["no_such_suite"]) == 2
    assert cli.main(["zz_fake", "--shapes", "llama-70b"]) == 2
    assert cli.main(["zz_fake", "--backend", "nope"]) == 2
    assert cli.main(["--list"]) == 0
    listing = capsys.readouterr().out
    assert "zz_fake    a fake suite" in listing and "zz_broken  not available: import failed" in listing


def test_makefile_script_delegates_to_the_cli():
    text = (Path(__file__).resolve().parents[2] / "bench" / "bench_quantize.py").read_text()
    assert 'main(["quantize", "hadamard", "qmatmul", *sys.argv[1:]])' in text


def test_markdown_of_a_results_csv(tmp_path, capsys):
    ctx = ctx_for(tmp_path)
    rows = [Row("a", Timing("t", [0.002]), shape="4x4", dtype="bfloat16", work=4e7, unit="GB/s", limit="copy_GB/s",
                peers={"torch": Timing("p", [0.006])}, params={"format": "mxfp4"})]
    path, _ = suite.finish("fake", FakeSuite, rows, ctx)
    capsys.readouterr()  # the console table
    assert cli.main(["--markdown", str(path)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == "Limits: copy_GB/s 10, fp32_mm_TFLOP/s 0.1."
    assert text[2] == "| case | shape | dtype | p50 ms | rate | of limit | vs torch | vs ghost |"
    assert text[4] == "| a | 4x4 | bfloat16 | 2 | 20 GB/s | 200.0 % | 3.00x | absent |"


def test_gpu_quick_is_refused_without_a_gpu(capsys):
    """--gpu-quick times the GPU targets' shapes; on a CPU it would run for hours, so it is one clear line."""
    from lowbit.bench import cli

    assert cli.main(["quantize", "--gpu-quick", "--device", "cpu"]) == 2
    assert "--gpu-quick" in capsys.readouterr().err
