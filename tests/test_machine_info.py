"""The machine a figure was measured on (``lvm.runtime.cpu_model``) and how benchmarks write their results."""
import json
import platform

from bench.results_io import write_results
from lvm.runtime import cpu_model


def test_cpu_model_reads_cpuinfo_and_falls_back(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14 96-Core Processor\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 9R14 96-Core Processor\n")
    assert cpu_model(info) == "AMD EPYC 9R14 96-Core Processor"
    assert cpu_model(tmp_path / "absent") == (platform.processor() or platform.machine())
    (tmp_path / "arm").write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # aarch64 lists no model name
    assert cpu_model(tmp_path / "arm") == (platform.processor() or platform.machine())
    assert isinstance(cpu_model(), str)


def test_results_are_written_as_json_and_markdown_together(tmp_path, capsys):
    result = {"machine": {"cpu": "x"}, "rows": [{"ms": 1.5}]}
    stem = write_results(tmp_path / "deep" / "inference-cpu", result, "| a |\n|---|\n| 1 |\n")
    assert json.loads(stem.with_suffix(".json").read_text()) == result
    assert stem.with_suffix(".md").read_text() == "| a |\n|---|\n| 1 |\n"
    assert "| a |" in capsys.readouterr().out
